"""KVSharer's greedy walk: rank the admissible layer pairs (by the distance of their calibration KV averages, at
random, or by local attention error), tentatively let the later layer read the earlier one's root owner, and keep
each pair that passes the validation guard until the goal is reached. Whole layers only."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.recipe import SearchSettings
from kvtool.search.best_first import to_plan
from kvtool.search.moves import Sources, identity
from kvtool.search.strategy import Context, Outcome, Try

RANKINGS = ("dissimilar", "similar", "random", "local")


def rank_pairs(dist: torch.Tensor, types: list[str], order: str, seed: int = 0) -> list[tuple[int, int]]:
    """All admissible pairs (i < j, same attention type) in search order. ``dist`` is the layer distance matrix, or
    for ``local`` the local damage matrix (lowest first)."""
    L = dist.shape[0]
    pairs = [(i, j) for j in range(1, L) for i in range(j) if types[i] == types[j]]
    if order in ("local", "similar"):
        return sorted(pairs, key=lambda p: float(dist[p[0], p[1]]))
    if order == "dissimilar":
        return sorted(pairs, key=lambda p: -float(dist[p[0], p[1]]))
    if order == "random":
        rng = random.Random(seed)
        rng.shuffle(pairs)
        return pairs
    raise KvtoolError(f"unknown order {order!r}; use one of {', '.join(RANKINGS)}")


def with_pair(src: Sources, i: int, j: int) -> Sources:
    """Whole-layer ``src`` with layer j reading i's root owner; layers that read j follow it (chains resolved)."""
    kv = src[0]
    root = kv[i]
    out = tuple(root if (k == j or s == j) else s for k, s in enumerate(kv))
    return out, out


@dataclass
class Greedy:
    """KVSharer's walk in one ranking (``order``), with the layer distance its distance orders rank by."""

    order: str = "dissimilar"
    distance: str = "euclidean"
    seed: int = 0  # for order="random"

    @classmethod
    def from_settings(cls, s: SearchSettings) -> Greedy:
        return cls(s.order, s.distance, s.seed)

    @property
    def default_metric(self) -> str:
        return "kl" if self.order == "local" else "cosine"

    @property
    def guarded(self) -> bool:  # the paper's orders accept a pair only above its cosine threshold
        return self.order != "local"

    def label(self) -> str:
        return f"greedy:{self.order}" + ("" if self.order in ("local", "random") else f":{self.distance}")

    def run(self, ctx: Context) -> Outcome:
        if self.order == "local":
            dist = ctx.local_errors(("kv",))["kv"]
        else:
            dist = ctx.stats.distance(self.distance)
        scorer = ctx.scorer()
        goal, types = ctx.goal, ctx.types
        state = scorer.initial(to_plan(identity(len(types))))
        src = identity(len(types))
        tries: list[Try] = []
        for i, j in rank_pairs(dist, types, self.order, self.seed):
            if goal.reached(src):
                break
            kv = src[0]
            if kv[j] != j or types[kv[i]] != types[j]:
                continue
            cand = with_pair(src, i, j)
            scored = scorer.score(state, to_plan(cand), start=j)
            value = scored.value()
            ok = ctx.threshold is None or scorer.passes(value, ctx.threshold)
            if ok:
                state = scorer.advance(state, scored)
                src = cand
            s = cand[0][j]
            tries.append(ctx.tried(Try(len(tries), j, i, "kv", f"{j}←{s}", round(value, 6), ok,
                                       sum(a != k for k, a in enumerate(src[0])), ctx.removed(src), ctx.needed)))
        final = [t.score for t in tries if t.accepted]
        return Outcome(src, final[-1] if final else None, tries, goal.reached(src),
                       {"pairs_tried": len(tries), "layer_forwards": scorer.layer_forwards},
                       {**ctx.phases, **scorer.seconds})
