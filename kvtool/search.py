"""``kvtool search``: find which layers give up their KV cache.

KVSharer's greedy search as published: rank every pair (i < j) by the distance between the layers' calibration KV
averages (most dissimilar first), walk the list, tentatively let j read i's KV (chains resolved to the root owner),
keep the pair if the output stays close to the base (cosine >= T, or KL <= T), stop at the target. Other orders
(similar, random) and fixed layouts use the same machinery, so they compare on equal terms.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtool.calibrate import CalibrationStats
from kvtool.errors import KvtoolError
from kvtool.plan import SharingPlan
from kvtool.scoring import HIGHER_IS_BETTER, Scorer

ORDERS = ("dissimilar", "similar", "random", "local", "best-first")
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


def rank_pairs(dist: torch.Tensor, types: list[str], order: str, seed: int = 0) -> list[tuple[int, int]]:
    """All admissible pairs (i < j, same attention type) in search order. ``dist`` is the layer distance matrix, or
    for ``local`` the local damage matrix (lowest first)."""
    L = dist.shape[0]
    pairs = [(i, j) for j in range(1, L) for i in range(j) if types[i] == types[j]]
    if order == "local":
        return sorted(pairs, key=lambda p: float(dist[p[0], p[1]]))
    if order == "dissimilar":
        return sorted(pairs, key=lambda p: -float(dist[p[0], p[1]]))
    if order == "similar":
        return sorted(pairs, key=lambda p: float(dist[p[0], p[1]]))
    if order == "random":
        rng = random.Random(seed)
        rng.shuffle(pairs)
        return pairs
    raise KvtoolError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")


def _num_consumers(src: list[int]) -> int:
    return sum(1 for k, s in enumerate(src) if s != k)


def with_pair(src: list[int], i: int, j: int) -> list[int]:
    """``src`` with layer j reading i's root owner; layers that read j follow it (chains resolved)."""
    root = src[i]
    out = list(src)
    for k, s in enumerate(out):
        if k == j or s == j:
            out[k] = root
    return out


@dataclass
class SearchResult:
    plan: SharingPlan
    tries: list[dict[str, Any]] = field(default_factory=list)
    exhausted: bool = False
    seconds: float = 0.0


def greedy(scorer: Scorer, pairs: list[tuple[int, int]], n: int, threshold: float, types: list[str],
           on_try: Callable[[dict], None] | None = None) -> tuple[list[int], list[dict], bool]:
    """Walk ``pairs``; keep each that passes the threshold; stop at ``n`` consumers. Returns (src, tries, exhausted)."""
    L = len(types)
    src = list(range(L))
    scorer.reset(SharingPlan(src))
    tries: list[dict] = []
    for i, j in pairs:
        if _num_consumers(src) >= n:
            break
        if src[j] != j or types[src[i]] != types[j]:
            continue
        cand = with_pair(src, i, j)
        value, token = scorer.score(SharingPlan(cand), start=j)
        ok = scorer.passes(value, threshold)
        if ok:
            scorer.accept(token)
            src = cand
        rec = {"i": i, "j": j, "source": cand[j], "score": round(value, 6), "accepted": ok,
               "kept": _num_consumers(src), "needed": n}
        tries.append(rec)
        if on_try:
            on_try(rec)
    exhausted = _num_consumers(src) < n
    return src, tries, exhausted


def best_first(scorer: Scorer, err: torch.Tensor, n: int, threshold: float, types: list[str], beam: int = 8,
               on_try: Callable[[dict], None] | None = None) -> tuple[list[int], list[dict], bool]:
    """At each step score the ``beam`` admissible pairs with the lowest local error and accept the best one, if it
    passes the threshold; stop at ``n`` consumers or when no candidate passes."""
    L = len(types)
    src = list(range(L))
    scorer.reset(SharingPlan(src))
    tries: list[dict] = []
    step = 0
    while _num_consumers(src) < n:
        readers = {s for k, s in enumerate(src) if s != k}
        cands = sorted({(src[i], j) for j in range(1, L) for i in range(j)
                        if src[j] == j and j not in readers and types[i] == types[j]},
                       key=lambda p: (float(err[p[0], p[1]]), p))[:beam]
        if not cands:
            break
        best = None  # (value, i, j, cand, token); only the running best keeps its captured activations
        step_tries = []
        for i, j in cands:
            cand = with_pair(src, i, j)
            value, token = scorer.score(SharingPlan(cand), start=j)
            if best is None or scorer.better(value, best[0]):
                best = (value, i, j, cand, token)
            step_tries.append({"step": step, "i": i, "j": j, "source": i, "score": round(value, 6),
                               "accepted": False, "kept": step, "needed": n})
        tries += step_tries
        ok = scorer.passes(best[0], threshold)
        if ok:
            value, i, j, cand, token = best
            scorer.accept(token)
            src = cand
            for rec in step_tries:
                rec["kept"] = step + 1
                rec["accepted"] = rec["i"] == i and rec["j"] == j
        if on_try:
            for rec in step_tries:
                on_try(rec)
        if not ok:
            break
        step += 1
    exhausted = _num_consumers(src) < n
    return src, tries, exhausted


def search(
    stats: str | Path | CalibrationStats,
    *,
    model=None,
    target: float | None = 0.3,
    layers: int | None = None,
    threshold: float | None = None,
    order: str = "best-first",
    distance: str = "euclidean",
    validate: str | None = None,
    beam: int = 4,
    seed: int = 0,
    layout: str | None = None,
    group_size: int = 4,
    strict: bool = False,
    merge_budget: float | None = None,
    incremental: bool = True,
    batch_size: int = 16,
    out: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    on_try: Callable[[dict], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search a sharing plan from calibration ``stats``; write it to ``out`` if given. See the module docstring."""
    from kvtool.atomic import check_writable_file
    from kvtool.layouts import layout_plan
    from kvtool.loading import load, model_fingerprint

    t0 = time.time()
    if out is not None:
        check_writable_file(out, force)
    st = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
    meta = st.meta
    types = list(meta["layer_types"])
    L = len(types)
    n = num_consumers(L, target, layers)
    common = dict(target=target if layers is None else n / L, model_name=meta["model_name"],
                  model_fingerprint=meta["model_fingerprint"], layer_types=types)
    provenance = {"model": meta.get("model"),
                  "calibration": {k: meta[k] for k in ("data", "data_hash", "samples", "seq_len", "seed")}}
    if layout is not None:
        plan = layout_plan(layout, types, n, **({"group_size": group_size} if layout == "grouped" else {}))
        plan.target, plan.model_name, plan.model_fingerprint = common["target"], meta["model_name"], \
            meta["model_fingerprint"]
        plan.details.update(provenance)
        result = SearchResult(plan=plan, seconds=time.time() - t0)
    else:
        if model is None or isinstance(model, (str, Path)):
            model, _ = load(model if model is not None else meta.get("model"), dtype=dtype, device=device)
        fp = model_fingerprint(model)
        if fp != meta["model_fingerprint"]:
            raise KvtoolError(f"the model's fingerprint ({fp}) differs from the calibration's "
                              f"({meta['model_fingerprint']}); recalibrate with this model")
        if order not in ORDERS:
            raise KvtoolError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
        if validate is None:
            validate = "kl" if order in ("local", "best-first") else "cosine"
        if threshold is None:
            threshold = DEFAULT_THRESHOLD[validate]
        scorer = Scorer(model, st.input_ids, st.final_hidden, metric=validate, batch_size=batch_size,
                        incremental=incremental)
        if order in ("local", "best-first"):
            from kvtool.local_scores import local_errors

            err = local_errors(model, st.input_ids)
            if order == "local":
                src, tries, exhausted = greedy(scorer, rank_pairs(err, types, "local"), n, threshold, types, on_try)
            else:
                src, tries, exhausted = best_first(scorer, err, n, threshold, types, beam, on_try)
        else:
            pairs = rank_pairs(st.distance(distance), types, order, seed)
            src, tries, exhausted = greedy(scorer, pairs, n, threshold, types, on_try)
        final = [t["score"] for t in tries if t["accepted"]]
        score = final[-1] if final else None
        plan = SharingPlan(src, method=f"greedy:{order}", threshold=threshold, score=score, **common,
                           details={"order": order, "distance": distance if order not in ("local", "best-first")
                                    else "local-attention-error", "validate": validate,
                                    **({"beam": beam} if order == "best-first" else {}),
                                    "higher_is_better": HIGHER_IS_BETTER[validate], "seed": seed,
                                    "pairs_tried": len(tries), "incremental": incremental,
                                    "layer_forwards": scorer.layer_forwards, **provenance})
        result = SearchResult(plan=plan, tries=tries, exhausted=exhausted)
        if exhausted:
            msg = (f"the pair list ran out with {len(plan.consumers)} of {n} consumers accepted at threshold "
                   f"{threshold}")
            if strict:
                raise KvtoolError(msg + " (--strict)")
            if warn:
                warn(msg + "; writing the best plan found")
    if merge_budget is not None:
        from kvtool.merge_plan import merge_settings

        result.plan.merge = merge_settings(st, merge_budget)
    result.seconds = time.time() - t0
    if out is not None:
        result.plan.save(out, force=force)
    return result
