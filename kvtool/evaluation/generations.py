"""Eval task ``generate``: greedy continuations of the prompt set by both variants, side by side."""

from __future__ import annotations

from typing import Any

import torch

from kvtool.data.chat import prompt_ids
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device


@torch.no_grad()
def generations(v: Variants, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` (one left-padded batch): exact-match rate and mean common-prefix length
    vs the base, and the first few samples."""
    tok = v.tokenizer
    rows = [prompt_ids(tok, p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    conts = {}
    for which in ("base", "shared"):
        with v.use(which) as m:
            out = m.generate(ids.to(model_device(m)), attention_mask=mask.to(model_device(m)),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        conts[which] = [_strip(r[width:].tolist(), tok) for r in out.cpu()]
    exact = sum(a == b for a, b in zip(conts["base"], conts["shared"], strict=True)) / len(prompts)
    prefix = [_common_prefix(a, b) for a, b in zip(conts["base"], conts["shared"], strict=True)]
    samples = [{"prompt": p, "base": tok.decode(a), "shared": tok.decode(b)}
               for p, a, b in list(zip(prompts, conts["base"], conts["shared"], strict=True))[:5]]
    return {"prompts": len(prompts), "new_tokens": new_tokens, "exact_match": exact,
            "mean_common_prefix": sum(prefix) / len(prefix), "samples": samples}


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
