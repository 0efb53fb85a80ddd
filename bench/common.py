"""What the bench scripts share: alternating side-by-side runs with their spread, "search, then score the plan", the
share of KV bytes a plan removes, sizes, the random-weight model presets and the ``--method`` selection.

The scripts import it as ``common``: run as ``python bench/NAME.py``, Python puts ``bench/`` on the path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# ---- alternation ---------------------------------------------------------------------------------------------------


def alternate(run: Callable[[str], T], names: Sequence[str] = ("base", "shared"), repeats: int = 3,
              warmup: int = 0) -> dict[str, list[T]]:
    """``run(name)`` once per name and round, the order reversed every other round (A B, B A, A B, ...), so a
    noisy machine's drift hits every name alike. ``warmup`` rounds run first and are not kept."""
    out: dict[str, list[T]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run(name)
            if r >= warmup:
                out[name].append(res)
    return out


@dataclass
class Spread:
    """A median and the range of the values it was taken over."""

    median: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def spread(xs: Sequence[float]) -> Spread:
    """The median of ``xs`` and their range."""
    return Spread(statistics.median(xs), min(xs), max(xs), len(xs))


def ratio_spread(a: Sequence[float], b: Sequence[float]) -> Spread:
    """``b / a`` as the ratio of the medians, with the range of the per-round ratios ``b[r] / a[r]``: the spread
    to state beside it (how much one round's pair disagrees with another's on this machine)."""
    per_round = [y / x for x, y in zip(a, b, strict=True)]
    return Spread(statistics.median(b) / statistics.median(a), min(per_round), max(per_round), len(per_round))


# ---- search and plan scoring ---------------------------------------------------------------------------------------


def timed_search(stats, model, **settings: Any):
    """``kvtool.search.search.search`` on ``stats`` and ``model`` with ``SearchSettings`` fields; returns (the
    ``SearchResult``, wall seconds of the call)."""
    from kvtool.search.search import search

    t0 = time.perf_counter()
    r = search(stats, model=model, **settings)
    return r, time.perf_counter() - t0


def removed_share(plan, sliding_window: int | None = None) -> float:
    """The share of the base model's KV-cache bytes ``plan`` removes (``cache_size``'s one formula), at the context
    its search counted at; ``sliding_window``: the model's, where the plan has sliding-window layers."""
    from kvtool.formats.cache_size import DEFAULT_CONTEXT, tensor_units
    from kvtool.formats.cache_size import removed_share as share

    types = plan.layer_types or ["full_attention"] * plan.num_layers
    units = tensor_units(types, sliding_window, plan.details.get("context", DEFAULT_CONTEXT))
    return share(plan.k_sources, plan.v_sources, units)


def score_plan(model, tok, plan, held, *, stats=None, cases=None) -> dict[str, float]:
    """A plan's quality on ``model``: held-out perplexity on the token ids ``held``, the share of the base KV a
    64-token prefill holds (checked layer by layer against the plan), the share it removes (``removed_share``),
    with ``cases`` passkey accuracy and with ``stats`` the calibration cosine and KL (float32). ``plan=None``:
    the model as it is (an export loaded with its sharing on)."""
    import torch

    from kvtool.crosslayer.kv_check import check_kv_in_effect
    from kvtool.crosslayer.runtime import sharing
    from kvtool.evaluation.passkey import passkey_accuracy
    from kvtool.metrics import perplexity
    from kvtool.search.compare import calibration_metrics

    out: dict[str, float] = {}
    with torch.no_grad():
        if stats is not None:
            out["calib_cosine"], out["calib_kl"] = calibration_metrics(model, stats, plan)
        with nullcontext() if plan is None else sharing(model, plan):
            out["ppl"] = perplexity(model, held)[0]
            out["kv_held"] = check_kv_in_effect(model, 64)
            if cases:
                out["passkey"] = passkey_accuracy(model, tok, cases)
    if plan is not None:
        out["kv_removed"] = removed_share(plan, getattr(model.config, "sliding_window", None))
    return out


# ---- --method NAME=k:v,... selections ------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=key:value,key:value`` (JSON values) as (NAME, {key: value})."""
    name, _, kv = text.partition("=")
    out: dict[str, Any] = {}
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition(":")
        out[k] = json.loads(v)
    return name, out


def pick_methods(defaults: dict[str, dict], specs: list[str], only: str | None) -> dict[str, dict]:
    """``defaults`` plus the ``NAME=k:v,...`` variants in ``specs``, narrowed to the comma-separated ``only``."""
    methods = {**defaults, **dict(parse_variant(m) for m in specs)}
    return {k: methods[k] for k in only.split(",")} if only else methods


# ---- sizes and random-weight models --------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes in a size such as ``8GiB``, ``512MiB``, ``1.5GB`` or ``4096`` (``kvtool.evaluation.serve.parse_size``,
    as an argparse type)."""
    from kvtool.errors import KvtoolError
    from kvtool.evaluation.serve import parse_size as library_parse_size

    try:
        return library_parse_size(text)
    except KvtoolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# Llama-3.x shapes (hidden, layers, heads, KV heads, MLP, vocab); "tiny" is for CPU tests.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, tie_word_embeddings=False),
}


def build_model(preset: str, device, dtype, max_positions: int):
    """A random-weight Llama with the preset's shape, built directly on ``device`` (sdpa attention, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(max_positions, 2048))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()
