"""Fixed single-pass layouts from the cross-layer sharing study (CLA pairs, YOCO tail, groups), for comparison.

Every layout respects attention types: a consumer only reads an earlier owner of its own type.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import SearchSettings
from kvtool.search.strategy import Context, Outcome


def _even(candidates: list, n: int) -> list:
    """``n`` items spread evenly over ``candidates`` (first and last included when n > 1)."""
    if n > len(candidates):
        raise KvtoolError(f"cannot place {n} consumers: only {len(candidates)} places fit")
    if n == 0:
        return []
    if n == 1:
        return [candidates[len(candidates) // 2]]
    idx = [round(k * (len(candidates) - 1) / (n - 1)) for k in range(n)]
    return [candidates[i] for i in idx]


def adjacent(types: list[str], n: int) -> dict[int, int]:
    """CLA-style: ``n`` disjoint pairs (2k, 2k+1) spread over depth; the upper layer of a pair reads the lower."""
    pairs = [(i, i + 1) for i in range(0, len(types) - 1, 2) if types[i] == types[i + 1]]
    return {j: i for i, j in _even(pairs, n)}


def tail(types: list[str], n: int) -> dict[int, int]:
    """YOCO / Gemma-3n style: the last ``n`` layers all read the last owner below them of their own type."""
    L = len(types)
    if n >= L:
        raise KvtoolError(f"tail layout: {n} consumers leave no owner among {L} layers")
    out = {}
    for j in range(L - n, L):
        below = [i for i in range(L - n) if types[i] == types[j]]
        if not below:
            raise KvtoolError(f"tail layout: layer {j} ({types[j]}) has no owner of its type below the tail")
        out[j] = below[-1]
    return out


def grouped(types: list[str], n: int, group_size: int = 4) -> dict[int, int]:
    """``n`` consumers in evenly spaced groups of ``group_size`` consecutive layers of one type; each consumer
    reads its group's first layer."""
    if group_size < 2:
        raise KvtoolError("group size must be at least 2")
    L = len(types)
    per = group_size - 1
    groups = -(-n // per)
    starts = [s for s in range(1, L - group_size + 1) if len(set(types[s : s + group_size])) == 1]
    if not starts:
        raise KvtoolError(f"grouped layout: no run of {group_size} layers of one type")
    chosen: list[int] = []
    for s in _even(starts, min(groups, len(starts))):
        if not chosen or s >= chosen[-1] + group_size:
            chosen.append(s)
    out: dict[int, int] = {}
    for s in chosen:
        for j in range(s + 1, s + group_size):
            if len(out) < n:
                out[j] = s
    if len(out) < n:
        raise KvtoolError(f"grouped layout: only {len(out)} of {n} consumers fit in groups of {group_size}")
    return out


LAYOUTS = {"adjacent": adjacent, "tail": tail, "grouped": grouped}


def layout_pairs(name: str, types: list[str], n: int, group_size: int = 4) -> dict[int, int]:
    """``{consumer: source}`` of layout ``name`` with ``n`` consumers."""
    fn = LAYOUTS.get(name)
    if fn is None:
        raise KvtoolError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}")
    return fn(types, n, group_size) if name == "grouped" else fn(types, n)


def layout_plan(name: str, types: list[str], n: int, group_size: int = 4) -> SharingPlan:
    """The plan of layout ``name`` with ``n`` consumers."""
    return SharingPlan.from_pairs(len(types), layout_pairs(name, types, n, group_size), method=f"layout:{name}",
                                  layer_types=list(types))


@dataclass
class Layout:
    """A fixed layout at the fewest consumers that meet the byte goal (or ``--layers`` consumers); unscored."""

    name: str = "adjacent"
    group_size: int = 4  # for "grouped"
    default_metric = "kl"
    guarded = False

    @classmethod
    def from_settings(cls, s: SearchSettings) -> Layout:
        return cls(s.layout or "adjacent", s.group_size)

    def label(self) -> str:
        return f"layout:{self.name}" + (f" (groups of {self.group_size})" if self.name == "grouped" else "")

    def run(self, ctx: Context) -> Outcome:
        L, goal = len(ctx.types), ctx.goal
        for n in range(L) if goal.layers is None else [goal.layers]:
            src = layout_plan(self.name, ctx.types, n, self.group_size).kv_source_layers
            sources = (tuple(src), tuple(src))
            if goal.reached(sources):
                return Outcome(sources, None, facts={"consumers": n})
        raise KvtoolError(f"the {self.name} layout cannot remove {ctx.needed:.0%} of the KV bytes")
