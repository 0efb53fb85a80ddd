"""Search orders: the admissible pairs in KVSharer's orders (distance, random, local error), and the greedy walk that
keeps each pair passing the validation threshold until the goal is reached (whole layers; best-first search is in
``best_first``)."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import ORDERS
from kvtool.search.moves import Goal
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


def greedy(scorer: Scorer, pairs: list[tuple[int, int]], goal: Goal, threshold: float | None, types: list[str],
           on_try: Callable[[dict], None] | None = None) -> tuple[list[int], list[dict], bool]:
    """Walk ``pairs``; keep each that passes the threshold; stop when ``goal`` is reached. Returns (src, tries,
    reached)."""
    L = len(types)
    state = scorer.initial(SharingPlan(list(range(L))))
    src = state.plan.kv_source_layers
    tries: list[dict] = []
    for i, j in pairs:
        if goal.reached((tuple(src), tuple(src))):
            break
        if src[j] != j or types[src[i]] != types[j]:
            continue
        cand = with_pair(src, i, j)
        scored = scorer.score(state, SharingPlan(cand), start=j)
        value = scored.value()
        ok = threshold is None or scorer.passes(value, threshold)
        if ok:
            state = scorer.advance(state, scored)
            src = cand
        rec = {"i": i, "j": j, "source": cand[j], "tensors": "kv", "move": f"{j}←{cand[j]}", "score": round(value, 6),
               "accepted": ok, "kept": num_consumers_of(src), "removed": goal.fraction((tuple(src), tuple(src))),
               "needed": goal.needed / (2 * sum(goal.units))}
        tries.append(rec)
        if on_try:
            on_try(rec)
    return src, tries, goal.reached((tuple(src), tuple(src)))
