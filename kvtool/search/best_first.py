"""Best-first search over moves, scored per byte, with a beam of partial maps and a refinement by swaps.

Each step, every partial map in the beam proposes the admissible moves with the lowest local attention error per
byte saved (per kind of move, see ``_ranked``); each is scored on the calibration chunks (incrementally, from the
layer it changes). With a beam width of 1 the move with the lowest score increase per byte saved is taken (bytes
past the target count for nothing); with a wider beam the ``width`` best children by score increase per byte removed
so far are kept, deduplicated. Maps that reach the goal are set aside; the best of them (by calibration score) is
the result (or, given ``choose``, the one it picks: ``search``'s held-out split of the calibration). A quality guard
(``threshold``) discards children past it; when no map reaches the goal the deepest one is returned as partial.
``refine`` then tries swapping one chosen move for an unchosen one while the score improves, at most ``refine``
swaps scored; ``choose`` picks among the maps it passed through. Everything is deterministic: ties break on the
moves' order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import removed_units
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import SearchSettings
from kvtool.search.moves import Goal, Move, Sources, admissible, apply_move, identity, saved_units, undo_move
from kvtool.search.scoring import HIGHER_IS_BETTER, Scorer, ScoreState
from kvtool.search.strategy import Context, OnTry, Outcome, Try


@dataclass
class Partial:
    src: Sources
    state: ScoreState
    moves: tuple[Move, ...]
    costs: tuple[float, ...]  # each move's score increase when it was taken (or swapped in)

    @property
    def value(self) -> float:
        return self.state.value


Choose = Callable[[list[Partial]], Partial]


def to_plan(src: Sources) -> SharingPlan:
    return SharingPlan.from_tensors(list(src[0]), list(src[1]))


def _loss(scorer: Scorer, value: float) -> float:
    return -value if HIGHER_IS_BETTER[scorer.metric] else value


def _ranked(src: Sources, types: list[str], err: dict[str, torch.Tensor], granularity: str, goal: Goal,
            pool: int, skip: set[Sources] | None = None) -> list[Move]:
    """The admissible moves with the lowest local error per unit saved (units past the goal count for nothing),
    skipping moves that lead to a map in ``skip``: ``pool`` whole-layer moves, and with per-tensor moves also
    ``pool // 2`` (at least one) of each of key-only and value-only moves. Per unit, the local error ranks a single
    tensor's move about twice as bad as a whole layer's on SmolLM2, so one shared pool would never let the
    calibration score compare them."""
    left = max(1, goal.left(src))
    units = list(goal.units)
    scored: dict[str, list[tuple[float, Move]]] = {"kv": [], "k": [], "v": []}
    for m in admissible(src, types, granularity):
        if skip is not None and apply_move(src, m) in skip:
            continue
        scored[m.tensors].append((float(err[m.tensors][m.i, m.j]) / max(1, min(saved_units(m, units), left)), m))
    quota = {"kv": pool, "k": max(1, pool // 2), "v": max(1, pool // 2)}
    out = [x for kind, xs in scored.items() for x in sorted(xs)[: quota[kind]]]
    return [m for _, m in sorted(out)]


def best_first(scorer: Scorer, err: dict[str, torch.Tensor], types: list[str], goal: Goal, *, pool: int = 4,
               width: int = 1, threshold: float | None = None, granularity: str = "layer", screen: int = 0,
               on_try: OnTry | None = None, choose: Choose | None = None) -> tuple[Partial, list[Try], bool]:
    """Returns (the best map that reaches ``goal``, or the deepest one when the guard stops every path; the tries;
    whether the goal was reached)."""
    L = len(types)
    units = list(goal.units)
    root = Partial(identity(L), scorer.initial(to_plan(identity(L))), (), ())
    root_loss = _loss(scorer, root.value)
    subset = list(range(screen)) if 0 < screen < scorer.num_batches else None
    beam, finished, deepest = [root], [], root
    seen: set[Sources] = {root.src}
    tries: list[Try] = []
    step = 0
    while beam:
        children = []  # (key, order, parent, move, scored)
        for parent in beam:
            left = goal.left(parent.src)
            for m in _ranked(parent.src, types, err, granularity, goal, pool, seen):
                src = apply_move(parent.src, m)
                seen.add(src)
                scored = scorer.score(parent.state, to_plan(src), start=m.j, batches=subset)
                gain = _loss(scorer, scored.value()) - _loss(scorer, parent.value)
                eff = max(1, min(saved_units(m, units), left))
                if width == 1:
                    key = gain / eff
                else:
                    done = max(1, min(goal.needed, removed_units(*src, units)))
                    key = (_loss(scorer, scored.value()) - root_loss) / done
                children.append((key, m, parent, scored, gain))
        if not children:
            break
        children.sort(key=lambda c: (c[0], c[1], c[2].moves))
        kept = []
        for _key, m, parent, scored, gain in children:
            ok, screened = False, subset is not None
            if len(kept) < width:
                if screened:
                    scored = scorer.complete(parent.state, scored)
                    gain = _loss(scorer, scored.value()) - _loss(scorer, parent.value)
                    screened = False
                ok = threshold is None or scorer.passes(scored.value(), threshold)
            src = apply_move(parent.src, m)
            rec = Try(step, m.j, m.i, m.tensors, m.label(), round(scored.value(), 6), ok, len(parent.moves) + ok,
                      goal.fraction(src), goal.needed / (2 * sum(units)), screened)
            tries.append(rec)
            if on_try:
                on_try(rec)
            if ok:
                kept.append(Partial(src, scorer.advance(parent.state, scored), parent.moves + (m,),
                                    parent.costs + (gain,)))
        for child in kept:
            if len(child.moves) > len(deepest.moves) or (
                    len(child.moves) == len(deepest.moves) and _loss(scorer, child.value) < _loss(scorer,
                                                                                                 deepest.value)):
                deepest = child
        finished += [c for c in kept if goal.reached(c.src)]
        beam = [c for c in kept if not goal.reached(c.src)]
        if width == 1 and finished:
            break
        step += 1
    if not finished:
        return deepest, tries, goal.reached(deepest.src)
    if choose is not None and len(finished) > 1:
        return choose(finished), tries, True
    best = min(finished, key=lambda c: (_loss(scorer, c.value), c.moves))
    return best, tries, True


def refine(scorer: Scorer, best: Partial, err: dict[str, torch.Tensor], types: list[str], goal: Goal, *,
           budget: int, pool: int = 4, granularity: str = "layer", on_try: OnTry | None = None,
           choose: Choose | None = None) -> tuple[Partial, list[Try]]:
    """Swap one chosen move for an unchosen one while the calibration score improves; at most ``budget`` swaps are
    scored. Chosen moves are tried for removal costliest first, replacements by local error per unit."""
    tries: list[Try] = []
    tried: set[Sources] = {best.src}
    path = [best]  # the maps the swaps passed through, for ``choose``
    improved = True
    while improved and len(tries) < budget:
        improved = False
        order = sorted(range(len(best.moves)), key=lambda n: (-best.costs[n], best.moves[n]))
        for n in order:
            m = best.moves[n]
            base = undo_move(best.src, m)
            for u in [u for u in _ranked(base, types, err, granularity, goal, pool, tried) if u != m]:
                src = apply_move(base, u)
                if not goal.reached(src) or src in tried:
                    continue
                tried.add(src)
                scored = scorer.score(best.state, to_plan(src))
                gain = _loss(scorer, scored.value()) - _loss(scorer, best.value)
                rec = Try("refine", u.j, u.i, u.tensors, f"{m.label()} → {u.label()}", round(scored.value(), 6),
                          gain < -1e-9, len(best.moves), goal.fraction(src), goal.needed / (2 * sum(goal.units)))
                tries.append(rec)
                if on_try:
                    on_try(rec)
                if gain < -1e-9:
                    best = Partial(src, scorer.advance(best.state, scored),
                                   best.moves[:n] + best.moves[n + 1 :] + (u,),
                                   best.costs[:n] + best.costs[n + 1 :] + (best.costs[n] + gain,))
                    path.append(best)
                    improved = True
                    break
                if len(tries) >= budget:
                    break
            if improved or len(tries) >= budget:
                break
    if choose is not None and len(path) > 1:
        return choose(path), tries
    return best, tries


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


def held_out_choice(selector: Scorer) -> tuple[Choose, dict[str, Any]]:
    """A ``choose`` for ``best_first``/``refine``: the candidate with the best score on the held-out chunks (ties:
    the earlier moves), and a dict that records how many maps it compared and the chosen one's score. Each map is
    scored once (the refinement starts from the beam's choice)."""
    record: dict[str, Any] = {"compared": 0}
    values: dict[Sources, float] = {}

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
class BestFirst:
    """kvtool's search: moves taken by calibration KL per byte, ``pool`` candidates scored per partial map and
    step, ``width`` partial maps kept, then at most ``refine`` swaps; ``holdout`` of the calibration chunks choose
    among the finished maps."""

    pool: int = 4
    width: int = 1
    refine: int = 0
    granularity: str = "layer"
    screen: int = 1
    holdout: float = 0.0
    default_metric = "kl"
    guarded = False

    @classmethod
    def from_settings(cls, s: SearchSettings) -> BestFirst:
        return cls(s.pool, s.beam_width, s.refine, s.granularity, s.screen, s.holdout)

    def label(self) -> str:
        extra = [f"pool {self.pool}"] + [f"width {self.width}"] * (self.width > 1) + \
            [f"refine {self.refine}"] * bool(self.refine) + [f"{self.granularity}s"] * (self.granularity != "layer") + \
            [f"holdout {self.holdout:g}"] * bool(self.holdout)
        return f"best-first ({', '.join(extra)})"

    def run(self, ctx: Context) -> Outcome:
        fit, held = holdout_rows(ctx.stats.input_ids.shape[0], self.holdout)
        scorer = ctx.scorer(fit)
        choose, chosen = (None, {}) if not held else held_out_choice(ctx.scorer(held, incremental=False))
        err = ctx.local_errors(("kv", "k", "v") if self.granularity == "tensor" else ("kv",))
        best, tries, reached = best_first(scorer, err, ctx.types, ctx.goal, pool=self.pool, width=self.width,
                                          threshold=ctx.threshold, granularity=self.granularity, screen=self.screen,
                                          on_try=ctx.on_try, choose=choose)
        swaps: list[Try] = []
        if self.refine and reached:
            t0 = time.time()
            best, swaps = refine(scorer, best, err, ctx.types, ctx.goal, budget=self.refine, pool=self.pool,
                                 granularity=self.granularity, on_try=ctx.on_try, choose=choose)
            ctx.phases["refine"] = time.time() - t0
        facts: dict[str, Any] = {"pairs_tried": len(tries), "swaps_tried": len(swaps),
                                 "layer_forwards": scorer.layer_forwards}
        if held:
            facts.update(holdout_rows=len(held), holdout_maps_compared=chosen.get("compared", 0),
                         holdout_score=chosen.get("score"))
        return Outcome(best.src, round(best.value, 6) if best.moves else None, tries + swaps, reached, facts,
                       {**ctx.phases, **scorer.seconds})
