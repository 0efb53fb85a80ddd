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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kvtool.atomic import check_writable_file
from kvtool.calibration.merge_budgets import merge_settings
from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import tensor_units, units_to_remove
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import SearchSettings
from kvtool.formats.stats import CalibrationStats
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import model_and_tokenizer
from kvtool.progress import Log
from kvtool.search.best_first import Choose, Partial, best_first, refine, to_plan
from kvtool.search.layouts import layout_plan
from kvtool.search.local_scores import local_errors_by_kind
from kvtool.search.moves import Goal, Sources, removed_units
from kvtool.search.orders import greedy, rank_pairs
from kvtool.search.scoring import HIGHER_IS_BETTER, Scorer

DEFAULT_THRESHOLD = {"cosine": 0.5, "kl": 1.0}  # cosine: the paper's T; kl: nats, a guard against ruinous maps


def num_consumers(num_layers: int, target: float | None, layers: int | None) -> int:
    """``round(target * L)`` consumers, or ``layers`` directly."""
    if layers is not None:
        n = layers
    elif target is not None:
        if not 0 <= target < 1:
            raise KvtoolError(f"--target must be in [0, 1), got {target}")
        n = round(target * num_layers)
    else:
        raise KvtoolError("give --target or --layers")
    if not 0 <= n < num_layers:
        raise KvtoolError(f"{n} consumers is impossible with {num_layers} layers (layer 0 always owns its cache)")
    return n


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


def holdout_rows(rows: int, share: float) -> tuple[list[int], list[int]]:
    """(fit rows, held-out rows) of the calibration chunks: every ``round(1 / share)``-th chunk is held out, so both
    parts spread over the whole text; no chunk is held out at ``share`` 0."""
    if not share:
        return list(range(rows)), []
    step = max(2, round(1 / share))
    held = list(range(step - 1, rows, step))
    if not held:
        raise KvtoolError(f"--holdout {share}: {rows} calibration chunks leave none to hold out; calibrate with "
                          f"more --samples")
    return [r for r in range(rows) if r not in held], held


def held_out_choice(selector: Scorer, num_layers: int, own_reference: bool) -> tuple[Choose, dict]:
    """A ``choose`` for ``best_first``/``refine``: the candidate with the best score on the held-out chunks (ties:
    the earlier moves), and a dict that records how many maps it compared and the chosen one's score. Each map is
    scored once (the refinement starts from the beam's choice)."""
    record: dict[str, Any] = {"compared": 0}
    values: dict[Sources, float] = {}
    if own_reference:  # the unshared model's own outputs under the scoring precision are the reference
        selector.initial(SharingPlan.identity(num_layers))

    def score_of(c: Partial) -> float:
        if c.src not in values:
            values[c.src] = selector.initial(to_plan(c.src)).value
            record["compared"] += 1
        return values[c.src]

    def choose(candidates: list[Partial]) -> Partial:
        scored = [(score_of(c), c) for c in candidates]
        sign = -1 if HIGHER_IS_BETTER[selector.metric] else 1
        value, best = min(scored, key=lambda x: (sign * x[0], x[1].moves))
        record["score"] = round(value, 6)
        return best

    return choose, record


@dataclass
class SearchResult:
    plan: SharingPlan
    tries: list[dict[str, Any]] = field(default_factory=list)
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
    on_try: Callable[[dict], None] | None = None,
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
    n = num_consumers(L, s.target, s.layers)
    common = dict(target=s.target if s.layers is None else n / L, model_name=meta["model_name"],
                  model_fingerprint=meta["model_fingerprint"], layer_types=types)
    provenance = {"model": meta.get("model"),
                  "calibration": {k: meta[k] for k in ("data", "data_hash", "samples", "seq_len", "seed")}}
    if s.layout is not None:
        plan = layout_plan(s.layout, types, n, **({"group_size": s.group_size} if s.layout == "grouped" else {}))
        plan.target, plan.model_name, plan.model_fingerprint = common["target"], meta["model_name"], \
            meta["model_fingerprint"]
        plan.details.update(provenance)
        result = SearchResult(plan=plan, seconds=time.time() - t0)
    else:
        model, _ = model_and_tokenizer(model, fallback=meta.get("model"), dtype=dtype, device=device,
                                       need_tokenizer=False)
        check_fingerprint(meta["model_fingerprint"], model_fingerprint(model), "the calibration",
                          "recalibrate with this model")
        order = s.order
        validate = s.validate or ("kl" if order in ("local", "best-first") else "cosine")
        # the paper's orders accept a pair only above its cosine threshold; best-first has no guard unless asked
        threshold = s.threshold if s.threshold is not None else (
            None if order in ("local", "best-first") else DEFAULT_THRESHOLD[validate])
        cfg = model.config
        units = tensor_units(types, getattr(cfg, "sliding_window", None), s.context)
        goal = Goal(tuple(units), units_to_remove(units, s.target) if s.layers is None else 0,
                    n if s.layers is not None else None)
        phases: dict[str, float] = {}
        scoring_model = model
        precision = scoring_dtype(model, s.precision)
        if precision != next(model.parameters()).dtype:
            t1 = time.time()
            scoring_model = copy.deepcopy(model).to(precision)  # bf16 matmuls: ~2x faster on a bf16 CPU
            phases["bf16_copy"] = time.time() - t1
        fit, held = holdout_rows(st.input_ids.shape[0], s.holdout)
        scorer = Scorer(scoring_model, st.input_ids[fit], st.final_hidden[fit], metric=validate,
                        batch_size=s.batch_size, incremental=s.incremental, own_reference=scoring_model is not model)
        choose, chosen = None, {}
        if held:
            choose, chosen = held_out_choice(Scorer(scoring_model, st.input_ids[held], st.final_hidden[held],
                                                    metric=validate, batch_size=s.batch_size, incremental=False,
                                                    own_reference=scoring_model is not model), L,
                                              scoring_model is not model)
        refine_tries: list[dict] = []
        if order in ("local", "best-first"):
            t1 = time.time()
            kinds = ("kv", "k", "v") if s.granularity == "tensor" else ("kv",)
            err = local_errors_by_kind(scoring_model, st.input_ids, kinds)
            phases["local_errors"] = time.time() - t1
            if order == "local":
                src, tries, reached = greedy(scorer, rank_pairs(err["kv"], types, "local"), goal, threshold, types,
                                             on_try)
                k_src = v_src = src
                final = [t["score"] for t in tries if t["accepted"]]
                score = final[-1] if final else None
            else:
                best, tries, reached = best_first(scorer, err, types, goal, pool=s.beam, width=s.beam_width,
                                                  threshold=threshold, granularity=s.granularity, screen=s.screen,
                                                  on_try=on_try, choose=choose)
                if s.refine and reached:
                    t1 = time.time()
                    best, refine_tries = refine(scorer, best, err, types, goal, budget=s.refine, pool=s.beam,
                                                granularity=s.granularity, on_try=on_try, choose=choose)
                    phases["refine"] = time.time() - t1
                k_src, v_src = list(best.src[0]), list(best.src[1])
                score = round(best.value, 6) if best.moves else None
        else:
            pairs = rank_pairs(st.distance(s.distance), types, order, s.seed)
            src, tries, reached = greedy(scorer, pairs, goal, threshold, types, on_try)
            k_src = v_src = src
            final = [t["score"] for t in tries if t["accepted"]]
            score = final[-1] if final else None
        plan = SharingPlan.from_tensors(k_src, v_src, method=f"greedy:{order}", threshold=threshold, score=score,
                                        **common)
        removed = removed_units((tuple(k_src), tuple(v_src)), units) / (2 * sum(units))
        plan.details = {"order": order, "distance": s.distance if order not in ("local", "best-first")
                        else "local-attention-error", "validate": validate,
                        **({"beam": s.beam, "beam_width": s.beam_width, "granularity": s.granularity,
                            "refine": s.refine} if order == "best-first" else {}),
                        **({"holdout": s.holdout, "holdout_rows": len(held), "holdout_maps_compared":
                            chosen.get("compared", 0), "holdout_score": chosen.get("score")} if held else {}),
                        **({"screen": s.screen} if s.screen else {}),
                        "context": s.context, "kv_bytes_removed": round(removed, 6),
                        "precision": str(precision).removeprefix("torch."), "batch_size": s.batch_size,
                        "higher_is_better": HIGHER_IS_BETTER[validate], "seed": s.seed,
                        "pairs_tried": len(tries), "swaps_tried": len(refine_tries), "incremental": s.incremental,
                        "layer_forwards": scorer.layer_forwards, **provenance}
        result = SearchResult(plan=plan, tries=tries + refine_tries, exhausted=not reached,
                              phases={**phases, **scorer.seconds})
        if not reached:
            want = f"{s.layers} layers" if s.layers is not None else f"{s.target:.0%} of the KV bytes"
            if threshold is None:
                why = "no admissible move is left"
            else:
                why = (f"the quality guard ({'KL' if validate == 'kl' else 'cosine'} "
                       f"{'<=' if validate == 'kl' else '>='} {threshold}) stopped the search")
            msg = f"{why} at {removed:.1%} of the KV bytes removed ({plan.describe()}), short of {want}"
            if not s.allow_partial:
                raise KvtoolError(msg + ("; loosen the guard, or pass --allow-partial to write this plan"
                                         if threshold is not None else "; pass --allow-partial to write this plan"))
            result.partial = True
            if warn:
                warn(msg)
    if s.merge_budget is not None:
        result.plan.merge = merge_settings(st, s.merge_budget, result.plan, s.merge_method, s.merge_allocation)
    result.seconds = time.time() - t0
    if out is not None:
        result.plan.save(out, force=force)
    return result
