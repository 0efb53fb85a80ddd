"""Search moves: a layer gives up its keys, its values, or both, to an earlier layer that owns them.

A partial map is a pair of source lists (keys, values). A move ``(j, "kv" | "k" | "v", i)`` lets layer j read that
tensor of layer i; it is admissible when i < j share an attention type, i owns what j will read, j owns what it gives
up, and no layer reads that tensor of j (sources stay owners, so maps never chain). Its worth is the bytes it saves:
one tensor of layer j at the counted context (``cache_size.tensor_units``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtool.formats.cache_size import removed_share, removed_units

TENSORS = {"kv": ("k", "v"), "k": ("k",), "v": ("v",)}


@dataclass(frozen=True, order=True)
class Move:
    j: int  # the layer that gives up its tensor(s)
    tensors: str  # "kv", "k" or "v"
    i: int  # the earlier layer it reads them from

    def label(self) -> str:
        return f"{self.j}←{self.i}" if self.tensors == "kv" else f"{self.j}{self.tensors}←{self.i}"


Sources = tuple[tuple[int, ...], tuple[int, ...]]  # (key sources, value sources)


def identity(num_layers: int) -> Sources:
    return tuple(range(num_layers)), tuple(range(num_layers))


def _point(src: Sources, m: Move, to: int) -> Sources:
    """``src`` with layer ``m.j``'s tensors of the move read from layer ``to``."""
    k, v = list(src[0]), list(src[1])
    if "k" in m.tensors:
        k[m.j] = to
    if "v" in m.tensors:
        v[m.j] = to
    return tuple(k), tuple(v)


def apply_move(src: Sources, m: Move) -> Sources:
    return _point(src, m, m.i)


def undo_move(src: Sources, m: Move) -> Sources:
    return _point(src, m, m.j)


def saved_units(m: Move, units: list[int]) -> int:
    return len(TENSORS[m.tensors]) * units[m.j]


def admissible(src: Sources, types: list[str], granularity: str) -> list[Move]:
    """Every move allowed from ``src``: whole layers, and with ``granularity="tensor"`` keys or values alone."""
    k, v = src
    L = len(k)
    read = {"k": {s for j, s in enumerate(k) if s != j}, "v": {s for j, s in enumerate(v) if s != j}}
    owns = {"k": lambda x: k[x] == x, "v": lambda x: v[x] == x}
    kinds = ("kv", "k", "v") if granularity == "tensor" else ("kv",)
    out = []
    for j in range(1, L):
        for kind in kinds:
            ts = TENSORS[kind]
            if not all(owns[t](j) and j not in read[t] for t in ts):
                continue
            out += [Move(j, kind, i) for i in range(j) if types[i] == types[j] and all(owns[t](i) for t in ts)]
    return out


@dataclass(frozen=True)
class Goal:
    """When a partial map is done: it removes ``needed`` units of ``units`` (the byte target), or, with ``layers``,
    has that many whole consumer layers."""

    units: tuple[int, ...]
    needed: int
    layers: int | None = None

    def reached(self, src: Sources) -> bool:
        return self.left(src) == 0

    def left(self, src: Sources) -> int:
        """Units still to remove (for ``layers``: a whole layer's worth per missing consumer)."""
        if self.layers is not None:
            have = sum(1 for j, (a, b) in enumerate(zip(*src, strict=True)) if a != j and b != j)
            return max(0, self.layers - have) * 2 * max(self.units)
        return max(0, self.needed - removed_units(*src, self.units))

    def fraction(self, src: Sources) -> float:
        return removed_share(*src, self.units)
