"""``kvtool eval --merge-budget``: KVMerger against H2O and StreamingLLM eviction at the same budgets, on the base
model and on the shared one, in one harness: KV bytes after prefill, passkey retrieval on long prompts, and
perplexity of a continuation read over a compressed long context.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from kvtool.compat import cache_kwargs
from kvtool.compression import METHODS, CompressionSettings, compression
from kvtool.errors import KvtoolError


@torch.no_grad()
def long_context_nll(model, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """Summed NLL of ``ids[:, context:]`` read after a prefill of ``ids[:, :context]`` (compressed when compression
    is on), in one continuation forward; returns (nll, predicted tokens)."""
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :context], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1:]
    rest = model(ids[:, context:-1], use_cache=True, **cache_kwargs(model, cache)).logits
    logits = torch.cat([first, rest], dim=1).float()
    target = ids[:, context:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


def compare_compression(v, budgets: list[float], methods: tuple[str, ...] = METHODS, *, passkey_length: int = 2048,
                        passkey_depths: tuple[float, ...] = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85,
                                                              0.95),
                        ppl_samples: int = 4, ppl_context: int = 1536, ppl_new: int = 512, data: str | None = None,
                        base_settings: CompressionSettings | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One row per (variant, method, budget), plus each variant uncompressed; ratios are against the base model's
    uncompressed cache."""
    from kvtool.data import heldout_chunks
    from kvtool.kv_check import prefill_kv_bytes
    from kvtool.passkey import build_cases, passkey_accuracy

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise KvtoolError(f"unknown merge method(s) {', '.join(bad)}; use {', '.join(METHODS)}")
    say = log or (lambda msg: None)
    tok = v.tokenizer
    cases = build_cases(tok, (passkey_length,), passkey_depths, seed=7)
    probe_ids = cases[len(cases) // 2].input_ids
    long_ids = heldout_chunks(tok, ppl_samples, ppl_context + ppl_new, data).input_ids
    template = base_settings or CompressionSettings()
    rows: list[dict[str, Any]] = []
    base_bytes = None
    for which in ("base", "shared"):
        with v.use(which) as m:
            for method, budget in [("none", None), *[(mt, b) for b in budgets for mt in methods]]:
                t0 = time.time()
                settings = None if method == "none" else CompressionSettings(
                    **{**template.to_dict(), "method": method, "budget": budget,
                       "thresholds": template.thresholds if method == "kvmerger" else None})
                with compression(m, settings) if settings is not None else contextlib.nullcontext():
                    kv = prefill_kv_bytes(m, probe_ids)
                    acc = passkey_accuracy(m, tok, cases)
                    nll, n = 0.0, 0
                    for i in range(long_ids.shape[0]):
                        a, b = long_context_nll(m, long_ids[i : i + 1], ppl_context)
                        nll, n = nll + a, n + b
                if base_bytes is None:
                    base_bytes = kv
                row = {"variant": which, "method": method, "budget": budget, "kv_bytes_prefill": kv,
                       "kv_ratio": kv / base_bytes, "passkey": acc,
                       "ppl": float(torch.tensor(nll / n).exp()), "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                shown = "-" if budget is None else budget
                say(f"{which:6s} {method:9s} budget {shown:>4}: KV {row['kv_ratio']:.3f} of base, "
                    f"passkey@{passkey_length} {acc:.2f}, long-context ppl {row['ppl']:.2f}")
    return {"passkey_length": passkey_length, "passkey_depths": list(passkey_depths), "ppl_samples": ppl_samples,
            "ppl_context": ppl_context, "ppl_new": ppl_new, "budgets": budgets, "methods": list(methods),
            "rows": rows}

