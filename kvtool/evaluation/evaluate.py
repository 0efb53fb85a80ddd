"""``kvtool eval``: what a plan costs in quality and buys in memory and speed, side by side with the base model.

Each task is an ``EvalTask`` dataclass of its own settings in its own module, found by name in
``kvtool.evaluation.tasks.TASKS``; this module loads the two models once, runs the tasks asked for (timing each),
and assembles the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvtool.atomic import check_writable_file, write_bytes_atomic, write_json_atomic
from kvtool.calibration.calibrate import collect_stats
from kvtool.data.texts import load_chunks
from kvtool.errors import CheckFailed, KvtoolError
from kvtool.evaluation.task import EvalContext, EvalTask, make_task
from kvtool.evaluation.tasks import TASKS, default_tasks
from kvtool.evaluation.variants import Variants, load_variants
from kvtool.formats.plan import SharingPlan
from kvtool.formats.sidecar import update_sidecar
from kvtool.formats.stats import CalibrationStats
from kvtool.plots import distance_heatmap
from kvtool.progress import Log, silent
from kvtool.versions import versions


def make_tasks(tasks: Sequence[str | EvalTask] | None = None, options: dict[str, dict[str, Any]] | None = None,
               full: bool = False) -> list[EvalTask]:
    """The tasks to run: names (default: every task marked ``default``) or ready ``EvalTask`` objects; ``options``
    (``{task: {option: value or text}}``) set the named ones, and every option is checked even for a task not run;
    ``full`` starts each named task from its ``FULL`` settings instead of the quick defaults."""
    options = options or {}
    for name, opts in options.items():
        if name not in TASKS:
            raise KvtoolError(f"unknown task {name!r} in an option; choose from {', '.join(TASKS)}")
        make_task(TASKS[name], opts, full)
    out: list[EvalTask] = []
    for t in default_tasks() if tasks is None else tasks:
        if isinstance(t, str) and t not in TASKS:
            unknown = sorted({x for x in tasks or () if isinstance(x, str) and x not in TASKS})
            raise KvtoolError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        task = make_task(TASKS[t], options.get(t), full) if isinstance(t, str) else t
        if all(x.name != task.name for x in out):
            out.append(task)
    return out


def evaluate(
    export_dir: str | Path | None = None,
    *,
    plan: SharingPlan | str | Path | None = None,
    model: str | None = None,
    tasks: Sequence[str | EvalTask] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    full: bool = False,
    data: str | None = None,
    json_out: str | Path | None = None,
    plots: str | Path | None = None,
    stats: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    vllm_python: str | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Evaluate a shared model side by side with its base; returns the report (and writes JSON/PNGs if asked).
    ``tasks``, ``options`` and ``full`` are ``make_tasks``'s; ``report["seconds"]`` times each step.
    Raises ``CheckFailed`` (after writing the JSON) when a checked figure disagrees with the plan."""
    t0 = time.time()
    todo = make_tasks(tasks, options, full)
    if json_out is not None:
        check_writable_file(json_out, force)
    ctx = EvalContext(Path(export_dir) if export_dir is not None else None, data, vllm_python, log or silent)
    for task in todo:
        task.check(ctx)
    v = ctx.variants = load_variants(export_dir, plan, model, dtype, device)
    seconds: dict[str, float] = {"load": round(time.time() - t0, 1)}
    report: dict[str, Any] = {
        "model": v.name,
        "source": str(export_dir) if export_dir is not None else "plan",
        "plan": {"kv_source_layers": v.plan.kv_source_layers, "consumers": len(v.plan.consumers),
                 "method": v.plan.method, "description": v.plan.describe(), "merge": v.plan.merge},
        "full": full, "settings": {t.name: asdict(t) for t in todo}, "tasks": {}, "seconds": seconds,
        "versions": versions(),
    }
    for task in todo:
        t1 = time.time()
        result = task.run(ctx)
        if result is not None:
            report["tasks"][task.name] = result
            seconds[task.name] = round(time.time() - t1, 1)
    if plots is not None:
        t1 = time.time()
        report["plots"] = _plots(v, Path(plots), stats, force)
        seconds["plots"] = round(time.time() - t1, 1)
    report["wall_time_s"] = round(time.time() - t0, 1)
    if json_out is not None:
        write_json_atomic(json_out, report)
    failed = [c for task in report["tasks"].values() for c in task.get("checks", []) if not c["ok"]]
    if failed:
        raise CheckFailed(f"{failed[0]['detail']}: refusing this report"
                          f"{f' (written to {json_out})' if json_out is not None else ''}", report)
    if export_dir is not None:
        update_sidecar(export_dir, metrics=summary(report))
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers an export's sidecar keeps from its latest eval: each task's ``summary``."""
    out: dict[str, Any] = {}
    for name, result in report["tasks"].items():
        if name in TASKS:
            out.update(TASKS[name].summary(result))
    return out


def _plots(v: Variants, out: Path, stats: str | Path | None, force: bool) -> dict[str, str]:
    """The layer-distance heatmap with the map drawn on it."""
    out.mkdir(parents=True, exist_ok=True)
    target = check_writable_file(out / "distance_map.png", force)
    if stats is not None:
        dist = CalibrationStats.load(stats).distance("euclidean")
    else:  # a small calibration pass of the base model is enough for the picture
        dist = collect_stats(v.base, load_chunks(None, v.tokenizer, 8, 128).input_ids)["dist_euclidean"]
    write_bytes_atomic(target, distance_heatmap(dist.numpy(), title=f"{v.name}: layer KV distance and the sharing "
                                                                    "map", kv_source_layers=v.plan.kv_source_layers))
    return {"distance_map": str(target)}
