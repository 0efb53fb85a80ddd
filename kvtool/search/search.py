"""``kvtool search``: find which layers (or which layers' keys or values) stop storing KV.

The target is a share of the KV-cache bytes (counted at ``context`` tokens per sequence, which matters only where
sliding-window layers hold fewer), and it is met: by default the search runs until the map removes at least that
share. A quality guard (``threshold``: KL ≤ T or cosine ≥ T) is opt-in; when it stops the search short, ``search``
raises, or with ``allow_partial`` returns the partial map flagged ``partial``.

Orders: ``best-first`` (kvtool's default: each step scores the moves with the lowest local attention error per byte and
takes the one whose calibration KL grows least per byte saved; optionally a beam of partial maps, per-tensor moves and
a refinement by swaps, see ``best_first``), ``local`` (a greedy walk over pairs by local error), and KVSharer's greedy
walk as published: rank every pair (i < j) by the distance between the layers' calibration KV averages (most
dissimilar first), tentatively let j read i's KV (chains resolved to the root owner), keep the pair if the output
stays close to the base (cosine ≥ T, the paper's T = 0.5 by default), until the target is reached. Fixed layouts use
the same machinery, so all compare on equal terms.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kvtool.atomic import check_writable_file
from kvtool.calibration.merge_budgets import merge_settings
from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import removed_share, tensor_units, units_to_remove
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import CalibrationSettings, Recipe, SearchSettings
from kvtool.formats.stats import CalibrationStats
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import model_and_tokenizer
from kvtool.progress import Log
from kvtool.search.layouts import Layout
from kvtool.search.moves import Goal
from kvtool.search.strategies import strategy_for
from kvtool.search.strategy import Context, OnTry, Try

DEFAULT_THRESHOLD = {"cosine": 0.5, "kl": 1.0}  # cosine: the paper's T; kl: nats, a guard against ruinous maps


def scoring_dtype(model, precision: str) -> torch.dtype:
    """The dtype candidates are scored in: bfloat16 where the hardware runs it natively (``auto``)."""
    own = next(model.parameters()).dtype
    if precision == "model":
        return own
    if precision == "bfloat16":
        return torch.bfloat16
    if next(model.parameters()).device.type == "cuda":
        return torch.bfloat16
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else own


def calibration_recipe(meta: dict[str, Any]) -> CalibrationSettings:
    """The settings a calibration ran with (as it recorded them; rebuilt from its fields for one written by 0.x)."""
    if "settings" in meta:
        return CalibrationSettings.from_dict(meta["settings"])
    data = meta.get("data")
    return CalibrationSettings(data=None if data == "default" else data, samples=meta["samples"],
                               seq_len=meta["seq_len"], seed=meta["seed"])


@dataclass
class SearchResult:
    plan: SharingPlan
    tries: list[Try] = field(default_factory=list)
    exhausted: bool = False
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent per phase (local errors, layers, ...)
    partial: bool = False  # the guard stopped the search short of the target (written only with allow_partial)


def search(
    stats: str | Path | CalibrationStats,
    *,
    model=None,
    settings: SearchSettings | None = None,
    out: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    on_try: OnTry | None = None,
    warn: Log | None = None,
    **fields: Any,
) -> SearchResult:
    """Search a sharing plan from calibration ``stats`` (a directory or ``CalibrationStats``) on ``model`` (a path,
    None for the calibrated model, or a loaded model); write it to ``out`` if given. ``settings`` or keyword fields
    of ``SearchSettings`` (target, order, threshold, ...) say how. See the module docstring."""
    try:
        s = replace(settings or SearchSettings(), **fields).validated()
    except TypeError as e:
        raise KvtoolError(f"search: {e}") from None
    t0 = time.time()
    if out is not None:
        check_writable_file(out, force)
    st = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
    meta = st.meta
    types = list(meta["layer_types"])
    L = len(types)
    if s.layers is not None and not 0 <= s.layers < L:
        raise KvtoolError(f"{s.layers} consumers is impossible with {L} layers (layer 0 always owns its cache)")
    strategy = strategy_for(s)
    scoring_model, window, facts = None, meta.get("sliding_window"), {}
    if not isinstance(strategy, Layout):
        model, _ = model_and_tokenizer(model, fallback=meta.get("model"), dtype=dtype, device=device,
                                       need_tokenizer=False)
        check_fingerprint(meta["model_fingerprint"], model_fingerprint(model), "the calibration",
                          "recalibrate with this model")
        window = getattr(model.config, "sliding_window", None)
        precision = scoring_dtype(model, s.precision)
        scoring_model = model if precision == next(model.parameters()).dtype else copy.deepcopy(model).to(precision)
        facts["precision"] = str(precision).removeprefix("torch.")
    elif window is None and "sliding_attention" in types:
        raise KvtoolError("this calibration predates kvtool's record of the sliding window; recalibrate")
    units = tensor_units(types, window, s.context)
    metric = s.validate or strategy.default_metric
    threshold = s.threshold if s.threshold is not None else (
        DEFAULT_THRESHOLD[metric] if strategy.guarded else None)
    goal = Goal(tuple(units), units_to_remove(units, s.target) if s.layers is None else 0, s.layers)
    ctx = Context(st, types, goal, scoring_model, metric, threshold, s.batch_size, s.incremental,
                  own_reference=scoring_model is not model, on_try=on_try)
    found = strategy.run(ctx)
    removed = removed_share(*found.sources, units)
    recipe = Recipe(meta.get("model"), meta.get("dtype"), calibration_recipe(meta), s)
    plan = SharingPlan.from_tensors(list(found.sources[0]), list(found.sources[1]), method=strategy.label(),
                                    target=s.target if s.layers is None else None, threshold=threshold,
                                    score=found.score,
                                    model_name=meta["model_name"], model_fingerprint=meta["model_fingerprint"],
                                    layer_types=types)
    if s.merge_budget is not None:
        plan.merge = merge_settings(st, s.merge_budget, plan, s.merge_method, s.merge_allocation)
    plan.details = {"recipe": recipe.to_dict(),
                    "measured": {"kv_bytes_removed": round(removed, 6), "validate": metric, **facts, **found.facts,
                                 "calibration_data_hash": meta["data_hash"]}}
    result = SearchResult(plan, found.tries, not found.reached, phases=found.phases)
    if not found.reached:
        want = f"{s.layers} layers" if s.layers is not None else f"{s.target:.0%} of the KV bytes"
        why = "no admissible move is left" if threshold is None else (
            f"the quality guard ({'KL' if metric == 'kl' else 'cosine'} {'<=' if metric == 'kl' else '>='} "
            f"{threshold}) stopped the search")
        msg = f"{why} at {removed:.1%} of the KV bytes removed ({plan.describe()}), short of {want}"
        if not s.allow_partial:
            raise KvtoolError(msg + ("; loosen the guard, or pass --allow-partial to write this plan"
                                     if threshold is not None else "; pass --allow-partial to write this plan"))
        result.partial = True
        if warn:
            warn(msg)
    result.seconds = time.time() - t0
    if out is not None:
        plan.save(out, force=force)
    return result
