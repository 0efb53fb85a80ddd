"""The recipe of a run: which model, how it was calibrated and how the map was searched. ``kvtool.compress`` saves it
in the export's sidecar, and ``kvtool export --recipe kvtool.json`` runs it again (calibration and search are
deterministic, so the same inputs give a byte-identical plan)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvtool.errors import KvtoolError, quoted
from kvtool.formats.plan import SharingPlan

ORDERS = ("dissimilar", "similar", "random", "local", "best-first")
LAYOUTS = ("adjacent", "tail", "grouped")
METRICS = ("cosine", "kl")
DISTANCES = ("euclidean", "kvsharer", "cosine")


def _from_dict(cls, d: Any, what: str):
    if not isinstance(d, dict):
        raise KvtoolError(f"{what} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise KvtoolError(f"{what}: unknown key(s) {quoted(unknown)}")
    return cls(**d).validated()


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
        return _from_dict(cls, d, "calibration settings")


GRANULARITIES = ("layer", "tensor")
DEFAULT_CONTEXT = 4096  # tokens per sequence at which KV bytes are counted (matters only for sliding-window layers)
_RETIRED_SEARCH_KEYS = ("strict",)  # recipes written before the target became a contract may still carry these


@dataclass
class SearchSettings:
    target: float | None = 0.3  # fraction of KV-cache bytes removed (at ``context`` tokens per sequence)
    layers: int | None = None  # or this many whole consumer layers
    threshold: float | None = None  # the quality guard (KL ≤ T or cosine ≥ T); None: the order's default
    order: str = "best-first"
    distance: str = "euclidean"
    validate: str | None = None  # cosine or kl; None: kl for local/best-first, cosine for the distance orders
    beam: int = 4  # best-first: candidate moves fully scored per partial map and step
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
        if self.order not in ORDERS:
            raise KvtoolError(f"unknown order {self.order!r}; use one of {', '.join(ORDERS)}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise KvtoolError(f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
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
        if self.beam < 1 or self.batch_size < 1 or self.screen < 0 or self.beam_width < 1 or self.refine < 0:
            raise KvtoolError("search: beam, beam width and batch size must be ≥ 1, screen and refine ≥ 0")
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
            d = {k: v for k, v in d.items() if k not in _RETIRED_SEARCH_KEYS}
        return _from_dict(cls, d, "search settings")


@dataclass
class Recipe:
    model: str | None = None  # where the base model comes from; None: the embedded default
    dtype: str | None = None
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    search: SearchSettings = field(default_factory=SearchSettings)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "calibration": self.calibration.to_dict(),
                "search": self.search.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        if not isinstance(d, dict):
            raise KvtoolError("recipe must be a JSON object")
        unknown = sorted(set(d) - {"model", "dtype", "calibration", "search"})
        if unknown:
            raise KvtoolError(f"recipe: unknown key(s) {quoted(unknown)}")
        return cls(d.get("model"), d.get("dtype"), CalibrationSettings.from_dict(d.get("calibration", {})),
                   SearchSettings.from_dict(d.get("search", {})))

    @classmethod
    def from_plan(cls, plan: SharingPlan) -> Recipe | None:
        """The recipe a plan written by ``kvtool search`` records in its details (None for a hand-made plan)."""
        det = plan.details or {}
        cal = det.get("calibration")
        if not isinstance(cal, dict):
            return None
        calibration = CalibrationSettings(data=cal.get("data"), samples=cal.get("samples", 32),
                                          seq_len=cal.get("seq_len", 128), seed=cal.get("seed", 0))
        if calibration.data == "default":
            calibration.data = None
        merge = plan.merge or {}
        search = SearchSettings(target=plan.target, threshold=plan.threshold, seed=det.get("seed", 0),
                                merge_budget=merge.get("budget") if merge else None,
                                merge_method=merge.get("method", "kvmerger"),
                                merge_allocation="calibrated" if merge.get("layer_budgets") else "even")
        if "layout" in det:
            search.layout = det["layout"]
            search.group_size = det.get("group_size", 4)
        else:
            search.order = det.get("order", search.order)
            search.validate = det.get("validate")
            search.beam = det.get("beam", search.beam)
            for key in ("granularity", "beam_width", "refine", "holdout", "context"):
                if key in det:
                    setattr(search, key, det[key])
            search.screen = det.get("screen", 0)  # plans record it when it is set
            search.incremental = det.get("incremental", True)
            if det.get("distance") in DISTANCES:
                search.distance = det["distance"]
        return cls(model=det.get("model"), calibration=calibration, search=search.validated())
