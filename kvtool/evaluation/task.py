"""What every eval task is: a dataclass of its own settings with ``run``, ``summary``, ``rows`` and ``table``; and
the context the tasks share (the two models, the held-out text, the log).

A task's fields are its options (``kvtool eval --set TASK.FIELD=VALUE``, parsed from the field's type); ``FULL``
holds the values ``--full`` runs with. ``summary``, ``rows``, ``table`` and ``notes`` read only the task's result,
so a report read back from JSON renders the same.
"""

from __future__ import annotations

import statistics
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kvtool.errors import KvtoolError
from kvtool.evaluation.variants import Variants
from kvtool.merging.methods import MergeMethod, method_from_dict
from kvtool.progress import Log, silent

Row = tuple[str, str, str, str]  # metric, base, shared, shared/base: one line of the side-by-side table


def opt(default: Any, help: str = "", *, min: float | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A task option: its default, one line of help, an optional lower bound and a parser for ``--set``."""
    return field(default=default, metadata={"help": help, "min": min, "parse": parse})


@dataclass
class EvalContext:
    """What the tasks of one ``evaluate()`` share; ``variants`` is set once the models are loaded (after ``check``)."""

    export_dir: Path | None = None
    data: str | None = None
    vllm_python: str | None = None
    log: Log = silent
    variants: Variants | None = None
    memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def v(self) -> Variants:
        if self.variants is None:
            raise RuntimeError("the models are not loaded yet")
        return self.variants

    @property
    def plan_merge(self) -> MergeMethod | None:
        """The plan's (or export's) merge setting, if it has one."""
        return method_from_dict(self.v.plan.merge) if self.v.plan.merge else None

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``'s result, computed once per ``key`` for all tasks (ppl and fidelity share one pass)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass
class EvalTask:
    """One eval task; subclasses are dataclasses whose fields are the task's own settings."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    default: ClassVar[bool] = False  # part of plain ``kvtool eval``
    FULL: ClassVar[dict[str, Any]] = {}  # the settings ``--full`` uses instead of the quick defaults

    def __post_init__(self) -> None:
        for f in fields(self):
            low, value = f.metadata.get("min"), getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if low is not None and any(isinstance(x, (int, float)) and x < low for x in values):
                raise KvtoolError(f"{self.name}.{f.name} must be at least {low:g}, got {value!r}")

    def check(self, ctx: EvalContext) -> None:
        """Refuse settings or inputs this task cannot run with, before any model loads."""

    def run(self, ctx: EvalContext) -> dict[str, Any] | None:
        """The task's entry of the report (``None``: nothing to run here, e.g. no merge budget known)."""
        raise NotImplementedError

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        """The few numbers an export's sidecar keeps."""
        return {}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        """Lines of the shared base | shared | ratio table."""
        return []

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        """A table of the task's own (a ``rich.table.Table``), or None."""
        return None

    @staticmethod
    def notes(result: dict[str, Any]) -> list[str]:
        """Plain lines printed after the tables."""
        return []


def make_task(cls: type[EvalTask], options: dict[str, Any] | None = None, full: bool = False) -> EvalTask:
    """``cls`` with the quick defaults (or ``FULL``) and then ``options``: values, or text to parse as ``--set``
    gives it."""
    known = {f.name for f in fields(cls)}
    values = dict(cls.FULL) if full else {}
    for key, value in (options or {}).items():
        if key not in known:
            raise KvtoolError(f"the {cls.name} task has no option {key!r}; its options: {', '.join(sorted(known))}")
        values[key] = parse_option(cls, key, value) if isinstance(value, str) else value
    return cls(**values)


def option_help(cls: type[EvalTask]) -> list[tuple[str, str, str]]:
    """(``task.option``, default, help) for each option of ``cls``."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        full = f" (--full: {_shown(cls.FULL[f.name])})" if f.name in cls.FULL else ""
        out.append((f"{cls.name}.{f.name}", _shown(default), f.metadata.get("help", "") + full))
    return out


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_option(cls: type[EvalTask], key: str, text: str) -> Any:
    """The value of option ``key`` of ``cls`` from its text (a comma list for a tuple, ``none`` for None)."""
    f = next(f for f in fields(cls) if f.name == key)
    parse = f.metadata.get("parse")
    try:
        if parse is not None:
            return None if text.strip().lower() == "none" else parse(text)
        return _convert(typing.get_type_hints(cls)[key], text.strip())
    except ValueError:
        raise KvtoolError(f"{cls.name}.{key}: cannot read {text!r} as {typing.get_type_hints(cls)[key]}") from None


def _convert(hint: Any, text: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return tuple(_convert(args[0], x.strip()) for x in text.split(",") if x.strip())
    if hint is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(text)
        return text.lower() in ("1", "true", "yes", "on")
    return hint(text)


def ratio_spread(base: list[float], shared: list[float]) -> dict[str, Any]:
    """The shared/base ratio of paired measurements (of the medians), the range of the per-pair ratios, and whether
    that range holds 1.0 (then the two cannot be told apart here: "within noise")."""
    ratios = sorted(s / b for b, s in zip(base, shared, strict=True) if b)
    if not ratios:
        return {"ratio": float("nan"), "low": float("nan"), "high": float("nan"), "within_noise": True, "pairs": 0}
    low, high = ratios[0], ratios[-1]
    return {"ratio": statistics.median(shared) / statistics.median(base), "low": low, "high": high,
            "within_noise": len(ratios) < 2 or low <= 1 <= high, "pairs": len(ratios)}


def shown_ratio(r: dict[str, Any], digits: int = 2) -> str:
    """A speed ratio for a table: ``1.04× (0.98–1.10), within noise`` or ``1.31× (1.25–1.40)``."""
    if r["pairs"] < 2:
        return f"{r['ratio']:.{digits}f}× (1 run: noise unknown)"
    text = f"{r['ratio']:.{digits}f}× ({r['low']:.{digits}f}–{r['high']:.{digits}f})"
    return f"{text}, within noise" if r["within_noise"] else text
