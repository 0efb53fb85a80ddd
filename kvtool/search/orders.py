"""Search orders: the admissible pairs in KVSharer's orders (distance, random, local error), the greedy walk that
keeps each pair passing the validation threshold, and best-first search."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import ORDERS
from kvtool.search.scoring import Scorer


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


def num_consumers_of(src: list[int]) -> int:
    return sum(1 for k, s in enumerate(src) if s != k)


def with_pair(src: list[int], i: int, j: int) -> list[int]:
    """``src`` with layer j reading i's root owner; layers that read j follow it (chains resolved)."""
    root = src[i]
    out = list(src)
    for k, s in enumerate(out):
        if k == j or s == j:
            out[k] = root
    return out


def greedy(scorer: Scorer, pairs: list[tuple[int, int]], n: int, threshold: float, types: list[str],
           on_try: Callable[[dict], None] | None = None) -> tuple[list[int], list[dict], bool]:
    """Walk ``pairs``; keep each that passes the threshold; stop at ``n`` consumers. Returns (src, tries, exhausted)."""
    L = len(types)
    state = scorer.initial(SharingPlan(list(range(L))))
    src = state.plan.kv_source_layers
    tries: list[dict] = []
    for i, j in pairs:
        if num_consumers_of(src) >= n:
            break
        if src[j] != j or types[src[i]] != types[j]:
            continue
        cand = with_pair(src, i, j)
        scored = scorer.score(state, SharingPlan(cand), start=j)
        value = scored.value()
        ok = scorer.passes(value, threshold)
        if ok:
            state = scorer.advance(state, scored)
            src = cand
        rec = {"i": i, "j": j, "source": cand[j], "score": round(value, 6), "accepted": ok,
               "kept": num_consumers_of(src), "needed": n}
        tries.append(rec)
        if on_try:
            on_try(rec)
    exhausted = num_consumers_of(src) < n
    return src, tries, exhausted


def best_first(scorer: Scorer, err: torch.Tensor, n: int, threshold: float, types: list[str], beam: int = 8,
               on_try: Callable[[dict], None] | None = None, screen: int = 0) -> tuple[list[int], list[dict], bool]:
    """At each step score the ``beam`` admissible pairs with the lowest local error and accept the best one, if it
    passes the threshold; stop at ``n`` consumers or when no candidate passes. With ``screen`` > 0 the candidates
    are compared on the first ``screen`` calibration batches only, and the winner is then scored on all of them
    (its full score decides the threshold and is the one recorded)."""
    L = len(types)
    state = scorer.initial(SharingPlan(list(range(L))))
    src = state.plan.kv_source_layers
    subset = list(range(screen)) if 0 < screen < scorer.num_batches else None
    tries: list[dict] = []
    step = 0
    while num_consumers_of(src) < n:
        readers = {s for k, s in enumerate(src) if s != k}
        cands = sorted({(src[i], j) for j in range(1, L) for i in range(j)
                        if src[j] == j and j not in readers and types[i] == types[j]},
                       key=lambda p: (float(err[p[0], p[1]]), p))[:beam]
        if not cands:
            break
        best = None  # (value, i, j, scored); only the running best keeps its captured activations
        step_tries = []
        for i, j in cands:
            scored = scorer.score(state, SharingPlan(with_pair(src, i, j)), start=j,
                                  batches=subset if len(cands) > 1 else None)
            value = scored.value()
            if best is None or scorer.better(value, best[0]):
                best = (value, i, j, scored)
            step_tries.append({"step": step, "i": i, "j": j, "source": i, "score": round(value, 6),
                               "accepted": False, "kept": step, "needed": n})
        tries += step_tries
        _, bi, bj, scored = best
        scored = scorer.complete(state, scored)
        value = scored.value()
        for rec in step_tries:
            if rec["i"] == bi and rec["j"] == bj:
                rec["score"] = round(value, 6)
        ok = scorer.passes(value, threshold)
        if ok:
            state = scorer.advance(state, scored)
            src = state.plan.kv_source_layers
            for rec in step_tries:
                rec["kept"] = step + 1
                rec["accepted"] = rec["i"] == bi and rec["j"] == bj
        if on_try:
            for rec in step_tries:
                on_try(rec)
        if not ok:
            break
        step += 1
    exhausted = num_consumers_of(src) < n
    return src, tries, exhausted
