"""Eval task ``passkey``: retrieval of a pass key hidden in long prompts, by both variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtool.data.passkey import NEW_TOKENS, PASSKEY_DEPTHS, PASSKEY_LENGTHS, PasskeyCase, answer_ok, build_cases
from kvtool.evaluation.task import EvalContext, EvalTask, Row, opt
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device


@torch.no_grad()
def passkey_accuracy(model, tokenizer, cases: list[PasskeyCase]) -> float:
    """Share of ``cases`` whose greedy answer starts with the right key."""
    hits = 0
    for c in cases:
        ids = c.input_ids.to(model_device(model))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += answer_ok(tokenizer.decode(out[0, ids.shape[1]:]), c.key)
    return hits / len(cases)


@torch.no_grad()
def passkey(v: Variants, lengths, depths, variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    variants = variants or v.names
    cases = build_cases(v.tokenizer, lengths, depths)
    acc: dict[str, dict[str, float]] = {w: {} for w in variants}
    for which in variants:
        with v.use(which) as m:
            for length in lengths:
                acc[which][str(length)] = passkey_accuracy(m, v.tokenizer, [c for c in cases if c.length == length])
    return {"depths": list(depths), "accuracy": acc}


@dataclass
class Passkey(EvalTask):
    """Retrieval of a pass key hidden at several depths of long prompts."""

    name: ClassVar[str] = "passkey"
    help: ClassVar[str] = "pass-key retrieval from long prompts"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"lengths": PASSKEY_LENGTHS, "depths": PASSKEY_DEPTHS}
    lengths: tuple[int, ...] = opt((512, 1024), "prompt lengths in tokens", min=16)
    depths: tuple[float, ...] = opt((0.1, 0.5, 0.9), "where the key sits (0 = start, 1 = end)", min=0)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        ctx.log(f"passkey retrieval at {', '.join(map(str, self.lengths))} tokens, {len(self.depths)} depths")
        return passkey(ctx.v, self.lengths, self.depths)

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        return {"passkey": result["accuracy"]}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        acc, rows = result["accuracy"], []
        for length in acc["base"]:
            rows.append((f"accuracy @ {length} tokens", f"{acc['base'][length]:.2f}", f"{acc['shared'][length]:.2f}",
                         ""))
            if "unhealed" in acc:
                rows.append((f"accuracy @ {length} before healing", "", f"{acc['unhealed'][length]:.2f}", ""))
        return rows
