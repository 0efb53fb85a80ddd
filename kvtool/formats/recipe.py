"""The recipe of a run: which model, how it was calibrated and how the map was searched. ``kvtool.compress`` saves it
in the export's sidecar, and ``kvtool export --recipe kvtool.json`` runs it again (calibration and search are
deterministic, so the same inputs give a byte-identical plan)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvtool.errors import KvtoolError, quoted
from kvtool.formats.cache_size import DEFAULT_CONTEXT
from kvtool.formats.fields import settings_from_dict
from kvtool.formats.heal_settings import HealSettings
from kvtool.formats.plan import SharingPlan

METRICS = ("cosine", "kl")
DISTANCES = ("euclidean", "kvsharer", "cosine")


@dataclass
class CalibrationSettings:
    data: str | None = None  # None: kvtool's shipped calibration set
    samples: int = 64  # 64 × 256 tokens: the smallest calibration measured to generalise (docs/RESULTS.md, issue 24)
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8

    def validated(self) -> CalibrationSettings:
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise KvtoolError("calibration: need samples ≥ 1, seq_len ≥ 2 and batch_size ≥ 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> CalibrationSettings:
        return settings_from_dict(cls, d, "calibration settings")


GRANULARITIES = ("layer", "tensor")
_RETIRED_SEARCH_KEYS = ("strict",)  # recipes written before the target became a contract may still carry these
_RENAMED_SEARCH_KEYS = {"beam": "pool"}  # recipes of 0.x releases


@dataclass
class SearchSettings:
    target: float | None = 0.3  # fraction of KV-cache bytes removed (at ``context`` tokens per sequence)
    layers: int | None = None  # or this many whole consumer layers
    threshold: float | None = None  # the quality guard (KL ≤ T or cosine ≥ T); None: the order's default
    order: str = "best-first"
    distance: str = "euclidean"
    validate: str | None = None  # cosine or kl; None: kl for local/best-first, cosine for the distance orders
    pool: int = 4  # best-first: candidate moves fully scored per partial map and step (0.x: ``beam``)
    seed: int = 0
    layout: str | None = None
    group_size: int = 4
    merge_budget: float | None = None  # also record prompt-KV merging at this kept share
    merge_method: str = "kvmerger"  # ... by this method (kvtool.merging.methods.METHODS)
    merge_allocation: str = "even"  # every merged layer alike, or "calibrated" from the key similarity (measured
    # worse on SmolLM2: docs/RESULTS.md)
    incremental: bool = True
    batch_size: int = 32  # calibration chunks per scoring forward
    screen: int = 1  # best-first: compare candidates on this many scoring batches first, then complete the kept one
    # (0: every candidate on all of them; no effect while the calibration fits one batch)
    precision: str = "auto"  # scoring forwards: "model" (its own dtype), "bfloat16", or "auto" (bfloat16 where the
    # hardware runs it natively: a GPU, or a CPU with AVX512-BF16/AMX; the model's dtype elsewhere)
    granularity: str = "layer"  # best-first moves: whole layers, or also a layer's keys or values alone
    beam_width: int = 1  # best-first: partial maps kept at each step
    refine: int = 0  # best-first: at most this many one-move swaps tried once the target is reached
    holdout: float = 0.0  # best-first: share of the calibration chunks kept out of the fit, to choose among the
    # beam's finished maps and the refinement's swaps by their KL on text they were not fitted on (0: by the fit KL)
    context: int = DEFAULT_CONTEXT
    allow_partial: bool = False  # when the quality guard stops the search short, return (and write) what it has

    def validated(self) -> SearchSettings:
        if not isinstance(self.order, str) or (self.layout is not None and not isinstance(self.layout, str)):
            raise KvtoolError("search: order and layout are names")
        if self.validate is not None and self.validate not in METRICS:
            raise KvtoolError(f"unknown validation metric {self.validate!r}; use one of {', '.join(METRICS)}")
        if self.distance not in DISTANCES:
            raise KvtoolError(f"unknown distance {self.distance!r}; use one of {', '.join(DISTANCES)}")
        if self.granularity not in GRANULARITIES:
            raise KvtoolError(f"unknown granularity {self.granularity!r}; use layer or tensor")
        if self.target is None and self.layers is None:
            raise KvtoolError("give --target or --layers")
        if self.target is not None and not 0 <= self.target < 1:
            raise KvtoolError(f"--target must be in [0, 1), got {self.target}")
        if self.precision not in ("auto", "model", "bfloat16"):
            raise KvtoolError(f"unknown scoring precision {self.precision!r}; use auto, model or bfloat16")
        if self.pool < 1 or self.batch_size < 1 or self.screen < 0 or self.beam_width < 1 or self.refine < 0:
            raise KvtoolError("search: pool, beam width and batch size must be ≥ 1, screen and refine ≥ 0")
        if self.context < 1:
            raise KvtoolError(f"--context must be ≥ 1 token, got {self.context}")
        if not 0 <= self.holdout < 1:
            raise KvtoolError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.order != "best-first" and self.layout is None and (
                self.granularity != "layer" or self.beam_width != 1 or self.refine or self.holdout):
            raise KvtoolError(f"--granularity tensor, --beam-width, --refine and --holdout need --order best-first "
                              f"(the {self.order} order walks whole-layer pairs)")
        if self.layers is not None and self.granularity != "layer":
            raise KvtoolError("--layers counts whole layers; with --granularity tensor give --target")
        if self.merge_budget is not None and not 0 < self.merge_budget <= 1:
            raise KvtoolError(f"--merge-budget must be in (0, 1], got {self.merge_budget}")
        if self.merge_allocation not in ("calibrated", "even"):
            raise KvtoolError(f"unknown merge allocation {self.merge_allocation!r}; use calibrated or even")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> SearchSettings:
        if isinstance(d, dict):
            d = {_RENAMED_SEARCH_KEYS.get(k, k): v for k, v in d.items() if k not in _RETIRED_SEARCH_KEYS}
        return settings_from_dict(cls, d, "search settings")


@dataclass
class Recipe:
    """Everything a run was given: the model, its dtype, and the calibration, search and (for a healed export) heal
    settings, each as its ``to_dict()``. ``search`` stores it in the plan's details (``details["recipe"]``, beside
    what it measured), the export keeps it in its sidecar, and ``kvtool export --recipe`` replays it."""

    model: str | None = None  # where the base model comes from; None: the embedded default
    dtype: str | None = None
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    heal: HealSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "calibration": self.calibration.to_dict(),
                "search": self.search.to_dict(), "heal": None if self.heal is None else self.heal.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        if not isinstance(d, dict):
            raise KvtoolError("recipe must be a JSON object")
        unknown = sorted(set(d) - {"model", "dtype", "calibration", "search", "heal"})
        if unknown:
            raise KvtoolError(f"recipe: unknown key(s) {quoted(unknown)}")
        for key in ("model", "dtype"):
            if not isinstance(d.get(key), (str, type(None))):
                raise KvtoolError(f"recipe: {key} must be a string or null")
        heal = d.get("heal")
        return cls(d.get("model"), d.get("dtype"), CalibrationSettings.from_dict(d.get("calibration", {})),
                   SearchSettings.from_dict(d.get("search", {})),
                   None if heal is None else HealSettings.from_dict(heal))

    @classmethod
    def from_plan(cls, plan: SharingPlan) -> Recipe | None:
        """The recipe a plan written by ``kvtool search`` records (None for a hand-made plan, or one written by a
        0.x release, whose details held only part of it)."""
        rec = (plan.details or {}).get("recipe")
        return None if rec is None else cls.from_dict(rec)
