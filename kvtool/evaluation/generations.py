"""Eval task ``generate``: greedy continuations of the prompt set by both variants, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtool.data.chat import prompt_ids
from kvtool.data.texts import eval_prompts
from kvtool.evaluation.task import EvalContext, EvalTask, Row, opt
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device


@torch.no_grad()
def generations(v: Variants, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` (one left-padded batch) by every variant; per variant against the base:
    the exact-match rate, the mean common-prefix length, and the token agreement (share of the ``new_tokens``
    positions holding the same token, or both having stopped); and the first few samples."""
    tok = v.tokenizer
    rows = [prompt_ids(tok, p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    conts = {}
    for which in v.names:
        with v.use(which) as m:
            out = m.generate(ids.to(model_device(m)), attention_mask=mask.to(model_device(m)),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        conts[which] = [_strip(r[width:].tolist(), tok) for r in out.cpu()]
    agree = {w: agreement(conts["base"], conts[w], new_tokens) for w in v.names if w != "base"}
    samples = [{"prompt": p, **{w: tok.decode(conts[w][k]) for w in v.names}} for k, p in enumerate(prompts[:5])]
    return {"prompts": len(prompts), "new_tokens": new_tokens, **agree["shared"],
            **({"unhealed": agree["unhealed"]} if "unhealed" in agree else {}), "samples": samples}


def agreement(base: list[list[int]], other: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Exact-match rate, mean common prefix and token agreement of ``other``'s continuations against ``base``'s."""
    n = len(base)
    prefix = [_common_prefix(a, b) for a, b in zip(base, other, strict=True)]
    same = [sum(x == y for x, y in zip(_fill(a, new_tokens), _fill(b, new_tokens), strict=True)) / new_tokens
            for a, b in zip(base, other, strict=True)]
    return {"exact_match": sum(a == b for a, b in zip(base, other, strict=True)) / n,
            "mean_common_prefix": sum(prefix) / n, "token_agreement": sum(same) / n}


def _fill(ids: list[int], n: int) -> list[int]:
    return (ids + [-1] * n)[:n]  # -1: stopped


def _strip(ids: list[int], tok) -> list[int]:
    stops = {tok.eos_token_id, tok.pad_token_id} - {None}
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k]
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Generate(EvalTask):
    """Greedy generation on the prompt set, base and shared side by side."""

    name: ClassVar[str] = "generate"
    help: ClassVar[str] = "greedy continuations of the prompt set against the base's"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"prompts": 20}
    prompts: int = opt(8, "prompts from the prompt set (20 in all)", min=1)
    new_tokens: int = opt(32, "greedy tokens per prompt", min=1)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        prompts = eval_prompts()[: self.prompts]
        ctx.log(f"greedy generation on {len(prompts)} prompts ({self.new_tokens} new tokens)")
        return generations(ctx.v, prompts, self.new_tokens)

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        return {"greedy_common_prefix": result["mean_common_prefix"], "greedy_token_agreement":
                result["token_agreement"]}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        g, n = result, result["new_tokens"]
        rows = [(f"exact match ({g['prompts']} prompts)", "1", f"{g['exact_match']:.2f}", ""),
                (f"common prefix (of {n} tokens)", "", f"{g['mean_common_prefix']:.1f}", ""),
                (f"token agreement (of {n})", "1", f"{g['token_agreement']:.2f}", "")]
        if "unhealed" in g:
            rows += [("common prefix before healing", "", f"{g['unhealed']['mean_common_prefix']:.1f}", ""),
                     ("token agreement before healing", "", f"{g['unhealed']['token_agreement']:.2f}", "")]
        return rows
