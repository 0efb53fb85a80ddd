"""Eval task ``passkey``: retrieval of a pass key hidden in long prompts, by both variants."""

from __future__ import annotations

from typing import Any

import torch

from kvtool.data.passkey import NEW_TOKENS, PasskeyCase, answer_ok, build_cases
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
