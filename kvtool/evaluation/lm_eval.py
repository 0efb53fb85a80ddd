"""``kvtool eval --lm-eval``: lm-evaluation-harness's own evaluator on both variants, offline, side by side.

Each variant is wrapped in the harness's ``HFLM`` and run through ``lm_eval.simple_evaluate`` on the same tasks:
kvtool's shipped tasks (``kvtool.evaluation.lm_eval_tasks``, data written at run time) or any task the harness knows
whose data is in the local Hugging Face cache. The Hub is never contacted. While the harness runs, every forward of
either model has its cache checked layer by layer against the sharing map (``check_layer_bytes``), so a shared model
that stopped sharing inside the harness fails instead of scoring like its base.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kvtool.crosslayer.kv_check import check_layer_bytes, layer_bytes
from kvtool.crosslayer.runtime import active_plan, sharing_state
from kvtool.data.passkey import PASSKEY_DEPTHS, PASSKEY_LENGTHS
from kvtool.errors import KvtoolError, first_line, quoted
from kvtool.evaluation.lm_eval_tasks import TASKS as KVTOOL_TASKS
from kvtool.evaluation.lm_eval_tasks import write_tasks
from kvtool.evaluation.task import EvalContext, EvalTask, opt
from kvtool.evaluation.variants import Variants
from kvtool.formats.plan import SharingPlan
from kvtool.progress import Log, silent

INSTALL = "pip install 'kvtool[eval]'"


def require_lm_eval() -> None:
    """Fail early, with the install line, when lm-evaluation-harness is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise KvtoolError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL}")


def run_lm_eval(v: Variants, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 1,
                passkey_lengths: Sequence[int] = PASSKEY_LENGTHS, passkey_depths: Sequence[float] = PASSKEY_DEPTHS,
                log: Log = silent) -> dict[str, Any]:
    """Run the harness's ``simple_evaluate`` on ``tasks`` for the base and the shared variant (at most ``limit``
    documents per task); returns ``{"lm_eval_version", "limit", "tasks": {task: {"samples", "metrics": {metric:
    {"base", "shared", "base_stderr", "shared_stderr"}}}}}``."""
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise KvtoolError(f"--lm-eval needs lm-evaluation-harness ({first_line(e)}): {INSTALL}") from e
    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not tasks:
        raise KvtoolError("no lm-eval task given")
    if limit is not None and limit < 1:
        raise KvtoolError(f"the lm-eval limit must be at least 1, got {limit}")
    tmp = tempfile.mkdtemp(prefix="kvtool-lm-eval-")
    try:
        with _harness_quiet(), _offline():
            include = write_tasks(tmp, v.tokenizer, passkey_lengths=passkey_lengths, passkey_depths=passkey_depths,
                                  max_length=_max_length(v.base))
            only_ours = all(t.startswith("kvtool_") for t in tasks)  # the harness's index takes seconds
            log("lm-eval: indexing tasks" + ("" if only_ours else " (kvtool's and the harness's)"))
            tm = TaskManager(include_path=str(include), include_defaults=not only_ours)
            unknown = [t for t in tasks if t not in tm.all_tasks]
            if unknown:
                raise KvtoolError(f"lm-eval knows no task {quoted(unknown)} (kvtool ships {', '.join(KVTOOL_TASKS)}; "
                                  "`lm-eval ls tasks` lists the harness's)")
            try:  # the data of every task must be at hand before any model runs
                tm.load(tasks)
            except Exception as e:  # noqa: BLE001 - datasets raises many types for "not cached"
                raise KvtoolError(f"lm-eval could not load the data of {quoted(tasks)} offline (kvtool runs the "
                                  f"harness without network; only data in the local Hugging Face cache can be used): "
                                  f"{first_line(e)}") from e
            raw: dict[str, dict[str, Any]] = {}
            for which in ("base", "shared"):
                log(f"lm-eval on the {which} model ({len(tasks)} task{'s' * (len(tasks) > 1)}"
                    + (f", at most {limit} documents each)" if limit else ")"))
                with v.use(which) as m, _kv_checked(m, v.plan if which == "shared" else None, which):
                    lm = HFLM(pretrained=m, tokenizer=copy.deepcopy(v.tokenizer), batch_size=batch_size)
                    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per bootstrapped metric
                        raw[which] = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit,
                                                     bootstrap_iters=1000, log_samples=False) or {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"lm_eval_version": lm_eval.__version__, "limit": limit, "tasks": _side_by_side(raw)}


def _side_by_side(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{task: {"samples": n, "metrics": {name: {base, shared, base_stderr, shared_stderr}}}}`` from the two
    ``simple_evaluate`` results (a metric's filter is named only when the task reports it under several)."""
    out: dict[str, Any] = {}
    base = raw["base"].get("results", {})
    for task, res in base.items():
        metrics: dict[str, dict[str, float | None]] = {}
        keys = [k for k, x in res.items() if "," in k and "_stderr," not in k and isinstance(x, (int, float))]
        names = [k.split(",", 1)[0] for k in keys]
        for key in keys:
            value = res[key]
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" or names.count(metric) == 1 else f"{metric} ({filt})"
            stderr_key = f"{metric}_stderr,{filt}"
            shared = raw["shared"].get("results", {}).get(task, {})
            metrics[name] = {"base": _num(value), "shared": _num(shared.get(key)),
                             "base_stderr": _num(res.get(stderr_key)), "shared_stderr": _num(shared.get(stderr_key))}
        n = raw["base"].get("n-samples", {}).get(task, {})
        out[task] = {"samples": n.get("effective"), "metrics": metrics}
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _max_length(model: nn.Module) -> int:
    """The context the harness will give the model (what it reads from the config; 2048 when none is set)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return 2048


@contextlib.contextmanager
def _kv_checked(model: nn.Module, plan: SharingPlan | None, which: str) -> Iterator[None]:
    """Check that ``model`` runs ``plan``'s map (None: no sharing), and the cache of every forward the harness makes
    against it, layer by layer (skipped under prompt-KV merging, whose counts depend on the prompt/decode split)."""
    L = model.config.num_hidden_layers
    active = active_plan(model)
    ident = SharingPlan.identity(L)
    runs = ((active or ident).k_sources, (active or ident).v_sources)
    want = ((plan or ident).k_sources, (plan or ident).v_sources)
    if runs != want:
        raise KvtoolError(f"the {which} model runs the map {runs}, not the one evaluated ({want})")

    def hook(_module, args, kwargs, output) -> None:
        cache = output.get("cache", output.get("past_key_values")) if hasattr(output, "get") else None
        st = sharing_state(model)
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if cache is None or not hasattr(cache, "layers") or ids is None or (st and st.merge_hook is not None):
            return
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # a 2-D mask spans every token seen (padding too)
            seen = mask.shape[1]
        elif isinstance(pos, torch.Tensor) and pos.numel():  # generate without a mask: positions count from 0
            seen = int(pos.max()) + 1
        elif kwargs.get("cache") is None and kwargs.get("past_key_values") is None:  # a fresh forward
            seen = ids.shape[1]
        else:
            return
        check_layer_bytes(model, layer_bytes(cache), seen, batch=ids.shape[0])

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No Hub access while the harness runs: datasets and huggingface_hub read only their local caches."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


@contextlib.contextmanager
def _harness_quiet() -> Iterator[None]:
    """The harness's and datasets' log lines and the datasets progress bars off for the run (kvtool reports through
    ``log``); the harness's request progress bars stay on stderr."""
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@dataclass
class LmEval(EvalTask):
    """lm-evaluation-harness tasks on both variants, offline (``--lm-eval TASKS``)."""

    name: ClassVar[str] = "lm_eval"
    help: ClassVar[str] = "lm-evaluation-harness tasks, offline (needs pip install 'kvtool[eval]')"
    tasks: tuple[str, ...] = opt((), "harness tasks: kvtool_pydoc_ppl, kvtool_passkey, kvtool_pydoc_next or any "
                                     "whose data is in the local Hugging Face cache")
    limit: int | None = opt(None, "at most this many documents per task", min=1)
    passkey_lengths: tuple[int, ...] = opt(PASSKEY_LENGTHS, "kvtool_passkey's prompt lengths", min=16)
    passkey_depths: tuple[float, ...] = opt(PASSKEY_DEPTHS, "kvtool_passkey's depths", min=0)

    def check(self, ctx: EvalContext) -> None:
        if not self.tasks:
            raise KvtoolError("the lm_eval task needs harness tasks: --lm-eval kvtool_pydoc_ppl,... or --set "
                              "lm_eval.tasks=...")
        require_lm_eval()

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        return run_lm_eval(ctx.v, self.tasks, limit=self.limit, passkey_lengths=self.passkey_lengths,
                           passkey_depths=self.passkey_depths, log=ctx.log)

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        """One row per harness task × metric, base and shared side by side."""
        from rich.table import Table

        le = result
        limit = f", at most {le['limit']} documents per task" if le.get("limit") else ""
        t = Table(title=f"lm-evaluation-harness {le['lm_eval_version']} (offline{limit})", title_justify="left")
        for c in ("task", "metric", "base", "shared", "shared/base"):
            t.add_column(c, justify="left" if c in ("task", "metric") else "right", no_wrap=c == "task")
        f = lambda x: "-" if x is None else f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"  # noqa: E731
        for task, r in le["tasks"].items():
            docs = f"{r['samples']} docs" if r["samples"] else ""
            labels = [task, docs] if len(r["metrics"]) > 1 else [f"{task}\n{docs}".strip()]
            for i, (name, m) in enumerate(r["metrics"].items()):
                b, s = m["base"], m["shared"]
                t.add_row(labels[i] if i < len(labels) else "", name, f(b), f(s),
                          f(s / b) if b and s is not None else "")
        return t
