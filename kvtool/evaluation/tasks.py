"""The eval tasks, found by name through ``TASKS`` (the one registry: ``evaluate()``, the CLI's ``--tasks`` and
``--set``, the tables and the sidecar's metrics take their list from it). A new task is one module with an
``EvalTask`` dataclass and one line here."""

from __future__ import annotations

from kvtool.evaluation.engine import Engine
from kvtool.evaluation.generations import Generate
from kvtool.evaluation.lm_eval import LmEval
from kvtool.evaluation.memory_speed import Memory, Speed
from kvtool.evaluation.merge_task import Merge
from kvtool.evaluation.passkey import Passkey
from kvtool.evaluation.quality import Fidelity, Perplexity
from kvtool.evaluation.serve import Serve
from kvtool.evaluation.task import EvalTask

TASKS: dict[str, type[EvalTask]] = {
    "ppl": Perplexity,
    "fidelity": Fidelity,
    "generate": Generate,
    "passkey": Passkey,
    "memory": Memory,
    "speed": Speed,
    "merge": Merge,
    "serve": Serve,
    "engine": Engine,
    "lm_eval": LmEval,
}


def default_tasks() -> tuple[str, ...]:
    """The tasks plain ``kvtool eval`` runs."""
    return tuple(name for name, cls in TASKS.items() if cls.default)
