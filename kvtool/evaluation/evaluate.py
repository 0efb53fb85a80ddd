"""``kvtool eval``: what a plan costs in quality and buys in memory and speed, side by side with the base model.

Quality tasks (ppl, fidelity, generate, passkey, merge) run both variants in this process on the same inputs; memory
and speed run each variant in a fresh subprocess, alternating, so peak memory and timings are its own. Each task
lives in its own module of this package; this one runs the ones asked for and assembles the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvtool.atomic import check_writable_file, write_bytes_atomic, write_json_atomic
from kvtool.calibration.calibrate import collect_stats
from kvtool.data.texts import eval_prompts, heldout_chunks, load_chunks
from kvtool.errors import CheckFailed, KvtoolError
from kvtool.evaluation.engine import engine_eval
from kvtool.evaluation.generations import generations
from kvtool.evaluation.lm_eval import require_lm_eval, run_lm_eval
from kvtool.evaluation.memory_speed import memory_speed
from kvtool.evaluation.merge_task import compare_merging
from kvtool.evaluation.passkey import passkey
from kvtool.evaluation.quality import quality
from kvtool.evaluation.serve import serve
from kvtool.evaluation.variants import DEFAULT_TASKS, TASKS, EvalSettings, Variants, load_variants
from kvtool.formats.plan import SharingPlan
from kvtool.formats.sidecar import update_sidecar
from kvtool.formats.stats import CalibrationStats
from kvtool.io.vllm_env import vllm_python as find_vllm_python
from kvtool.merging.methods import make_method, method_from_dict
from kvtool.plots import distance_heatmap
from kvtool.progress import Log, silent
from kvtool.versions import versions


def evaluate(
    export_dir: str | Path | None = None,
    *,
    plan: SharingPlan | str | Path | None = None,
    model: str | None = None,
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    data: str | None = None,
    settings: EvalSettings | None = None,
    json_out: str | Path | None = None,
    plots: str | Path | None = None,
    stats: str | Path | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_limit: int | None = None,
    merge_budgets: list[float] | None = None,
    merge_methods: tuple[str, ...] | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    vllm_python: str | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Evaluate a shared model side by side with its base; returns the report (and writes JSON/PNGs if asked).
    Raises ``CheckFailed`` (after writing the JSON) when a checked figure disagrees with the plan."""
    t0 = time.time()
    s = settings or EvalSettings()
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise KvtoolError(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    if "serve" in tasks and not s.serve_kv_budget:
        raise KvtoolError("the serve task needs a KV budget (--kv-budget, e.g. 256MiB)")
    if json_out is not None:
        check_writable_file(json_out, force)
    say = log or silent
    if lm_eval_tasks:
        require_lm_eval()
    if "engine" in tasks:
        if export_dir is None:
            raise KvtoolError("--engine vllm serves an export: give its directory, not --plan")
        vllm_python = find_vllm_python(vllm_python)
    v = load_variants(export_dir, plan, model, dtype, device)
    report: dict[str, Any] = {
        "model": v.name,
        "source": str(export_dir) if export_dir is not None else "plan",
        "plan": {"kv_source_layers": v.plan.kv_source_layers, "consumers": len(v.plan.consumers),
                 "method": v.plan.method, "description": v.plan.describe(), "merge": v.plan.merge},
        "settings": asdict(s), "tasks": {}, "versions": versions(),
    }
    T = report["tasks"]
    if "ppl" in tasks or "fidelity" in tasks:
        say("perplexity and fidelity on held-out text")
        ch = heldout_chunks(v.tokenizer, s.ppl_samples, s.ppl_seq_len, data)
        q = quality(v, ch.input_ids)
        q["ppl"]["data"] = ch.source
        if "ppl" in tasks:
            T["ppl"] = q["ppl"]
        if "fidelity" in tasks:
            T["fidelity"] = q["fidelity"]
    if "generate" in tasks:
        say("greedy generation on the prompt set")
        T["generate"] = generations(v, eval_prompts(), s.gen_new_tokens)
    if "passkey" in tasks:
        say(f"passkey retrieval at {', '.join(map(str, s.passkey_lengths))} tokens")
        T["passkey"] = passkey(v, s.passkey_lengths, s.passkey_depths)
    if "memory" in tasks or "speed" in tasks:
        say(f"memory and speed (batch {s.speed_batch} x {s.speed_prompt} prompt + {s.speed_new} new, "
            f"{s.speed_repeats} runs each, fresh processes)")
        T.update(memory_speed(v, s, tasks))
    if "merge" in tasks:
        plan_merge = method_from_dict(v.plan.merge) if v.plan.merge else None
        budgets = list(merge_budgets or ([plan_merge.budget] if plan_merge and plan_merge.budget else []))
        if budgets:
            say(f"KV merging vs eviction at budget {', '.join(map(str, budgets))} "
                f"(passkey at {s.merge_passkey_length}, long-context perplexity)")
            T["merge"] = compare_merging(
                v, budgets, merge_methods, passkey_length=s.merge_passkey_length,
                passkey_depths=s.merge_passkey_depths, ppl_samples=s.merge_ppl_samples,
                ppl_context=s.merge_ppl_context, ppl_new=s.merge_ppl_new, data=data, plan_merge=plan_merge,
                log=say)
    if "serve" in tasks:
        plan_merge = method_from_dict(v.plan.merge) if v.plan.merge else None
        merge = plan_merge or (make_method(budget=merge_budgets[0]) if merge_budgets else None)
        say(f"throughput within {s.serve_kv_budget / 2**20:.0f} MiB of KV cache ({s.serve_prompt} prompt + "
            f"{s.serve_new} new tokens, {s.serve_repeats} runs each, fresh processes)")
        T["serve"] = serve(v, s.serve_kv_budget, prompt=s.serve_prompt, new=s.serve_new, repeats=s.serve_repeats,
                           merge=merge, log=say)
    if "engine" in tasks:
        say(f"vLLM side by side at {s.engine_kv_memory / 2**20:,.0f} MiB of KV cache ({s.engine_prompt} prompt + "
            f"{s.engine_new} new tokens per request, KV cache {', '.join(s.engine_kv_dtypes)}, fresh engines)")
        T["engine"] = engine_eval(v, str(export_dir), python=vllm_python, kv_memory=s.engine_kv_memory,
                                  dtype=str(v.base.dtype).removeprefix("torch."), prompt=s.engine_prompt,
                                  new=s.engine_new, kv_cache_dtypes=s.engine_kv_dtypes, samples=s.ppl_samples,
                                  seq_len=s.ppl_seq_len, gen_new=s.gen_new_tokens, data=data,
                                  tensor_parallel_size=s.engine_tensor_parallel, log=say)
    if lm_eval_tasks:
        T["lm_eval"] = run_lm_eval(v, lm_eval_tasks, limit=lm_eval_limit, passkey_lengths=s.passkey_lengths,
                                   passkey_depths=s.passkey_depths, log=say)
    if plots is not None:
        report["plots"] = _plots(v, Path(plots), stats, force)
    report["wall_time_s"] = round(time.time() - t0, 1)
    if json_out is not None:
        write_json_atomic(json_out, report)
    failed = [c for task in T.values() for c in task.get("checks", []) if not c["ok"]]
    if failed:
        raise CheckFailed(f"{failed[0]['detail']}: refusing this report"
                          f"{f' (written to {json_out})' if json_out is not None else ''}", report)
    if export_dir is not None:
        update_sidecar(export_dir, metrics=summary(report))
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers an export's sidecar keeps from its latest eval."""
    T = report["tasks"]
    out: dict[str, Any] = {}
    if "ppl" in T:
        out.update(ppl_base=T["ppl"]["base"], ppl_shared=T["ppl"]["shared"])
        if "unhealed" in T["ppl"]:
            out["ppl_unhealed"] = T["ppl"]["unhealed"]
    if "generate" in T:
        out.update(greedy_common_prefix=T["generate"]["mean_common_prefix"],
                   greedy_token_agreement=T["generate"]["token_agreement"])
    if "memory" in T:
        out["kv_bytes_ratio"] = T["memory"]["kv_bytes"]["ratio"]
    if "speed" in T:
        out["decode_speed_ratio"] = T["speed"]["decode_tok_s"]["ratio"]
    if "passkey" in T:
        out["passkey"] = T["passkey"]["accuracy"]
    if "engine" in T:
        out["vllm_block_ratio"] = T["engine"]["rows"]["shared"]["block_ratio"]
    if "serve" in T:
        sh = T["serve"]["rows"]["shared"]
        out.update(serve_max_batch_ratio=sh["max_batch_ratio"], serve_tok_s_ratio=sh["gen_tok_s_ratio"])
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
