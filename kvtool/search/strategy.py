"""What every search strategy shares: the context it searches in, one try, and the outcome it returns.

A strategy is a dataclass of its own settings with ``from_settings(SearchSettings)``, ``label()`` (the plan's
method), ``default_metric`` / ``guarded`` (the validation metric it scores with, and whether the paper's cosine
guard applies unless the user sets one) and ``run(Context) -> Outcome``. ``search.strategies.ORDERS`` finds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from kvtool.formats.cache_size import removed_share
from kvtool.formats.recipe import SearchSettings
from kvtool.formats.stats import CalibrationStats
from kvtool.search.local_scores import local_errors_by_kind
from kvtool.search.moves import Goal, Sources
from kvtool.search.scoring import Scorer


@dataclass(frozen=True)
class Try:
    """One scored candidate: ``move`` (its label, e.g. ``7←3``, ``7k←3`` or ``a → b`` for a swap), its score, and
    where the search stood after it (moves kept, the KV-byte share removed and needed). ``screened``: the score is
    over the screening batches only (best-first's ``screen``), so it compares with the step's other screened tries,
    not with a full score; such a try was passed over for a better one, not refused by the guard."""

    step: int | str  # the step, or "refine" for a swap
    j: int
    i: int
    tensors: str  # "kv", "k" or "v"
    move: str
    score: float
    accepted: bool
    kept: int
    removed: float
    needed: float
    screened: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OnTry = Callable[[Try], None]


@dataclass
class Outcome:
    """What a strategy found: the map's key and value sources, its calibration score (None when unscored), every
    try, whether the goal was reached, and what it measured on the way (``facts``) and how long its phases took."""

    sources: Sources
    score: float | None
    tries: list[Try] = field(default_factory=list)
    reached: bool = True
    facts: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    """What a strategy searches with: the calibration, the layer types, the byte goal, the scoring model (None for
    layouts, which score nothing), the validation metric and guard, and the try callback."""

    stats: CalibrationStats
    types: list[str]
    goal: Goal
    model: nn.Module | None = None
    metric: str = "kl"
    threshold: float | None = None
    batch_size: int = 32
    incremental: bool = True
    own_reference: bool = False  # the scoring model differs in precision from the calibrated one
    on_try: OnTry | None = None
    phases: dict[str, float] = field(default_factory=dict)

    def scorer(self, rows: list[int] | None = None, incremental: bool | None = None) -> Scorer:
        """A scorer on the calibration chunks ``rows`` (default: all)."""
        st = self.stats
        ids, final = (st.input_ids, st.final_hidden) if rows is None else (st.input_ids[rows], st.final_hidden[rows])
        return Scorer(self.model, ids, final, metric=self.metric, batch_size=self.batch_size,
                      incremental=self.incremental if incremental is None else incremental,
                      own_reference=self.own_reference)

    def local_errors(self, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        t0 = time.time()
        err = local_errors_by_kind(self.model, self.stats.input_ids, kinds)
        self.phases["local_errors"] = time.time() - t0
        return err

    def tried(self, t: Try) -> Try:
        if self.on_try is not None:
            self.on_try(t)
        return t

    def removed(self, src: Sources) -> float:
        return removed_share(*src, self.goal.units)

    @property
    def needed(self) -> float:
        return self.goal.needed / (2 * sum(self.goal.units))


class Strategy(Protocol):
    default_metric: str
    guarded: bool

    @classmethod
    def from_settings(cls, s: SearchSettings) -> Strategy: ...

    def label(self) -> str: ...

    def run(self, ctx: Context) -> Outcome: ...
