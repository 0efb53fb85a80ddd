"""``kvtool eval``: what a plan costs in quality and buys in memory and speed, side by side with the base model.

Quality tasks (ppl, fidelity, generate, passkey) run both variants in this process on the same inputs; memory and
speed run each variant in a fresh subprocess (``kvtool.probe``), alternating, so peak memory and timings are its own.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.errors import KvtoolError
from kvtool.plan import SharingPlan

TASKS = ("ppl", "fidelity", "generate", "passkey", "memory", "speed", "merge")
_PROMPTS = Path(__file__).with_name("assets") / "prompts.json"


@dataclass
class EvalSettings:
    ppl_samples: int = 8
    ppl_seq_len: int = 256
    gen_new_tokens: int = 32
    passkey_lengths: tuple[int, ...] = (512, 1024, 2048)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    speed_batch: int = 4
    speed_prompt: int = 512
    speed_new: int = 32
    speed_repeats: int = 2
    merge_passkey_length: int = 2048
    merge_passkey_depths: tuple[float, ...] = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
    merge_ppl_samples: int = 4
    merge_ppl_context: int = 1536
    merge_ppl_new: int = 512


@dataclass
class Variants:
    """The base model and the shared one: one model object under a sharing context (plan), or two (export)."""

    base: nn.Module
    tokenizer: Any
    plan: SharingPlan
    shared_model: nn.Module | None = None  # an export; None means "base under ``plan``"
    base_arg: str | None = None  # how a subprocess loads the base
    shared_args: list[str] = field(default_factory=list)  # ... and the shared variant

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[nn.Module]:
        if which == "base" or self.shared_model is not None:
            yield self.base if which == "base" else self.shared_model
            return
        from kvtool.runtime import sharing

        with sharing(self.base, self.plan):
            yield self.base


def load_variants(export_dir: str | Path | None, plan: SharingPlan | str | Path | None, model: str | None,
                  dtype: str | None = None, device: str | None = None, tmpdir: str | None = None) -> Variants:
    from kvtool.export import read_sidecar
    from kvtool.loading import load, model_fingerprint

    if (export_dir is None) == (plan is None):
        raise KvtoolError("give an exported directory or --plan (not both)")
    dev_args = (["--device", device] if device else []) + (["--dtype", dtype] if dtype else [])
    if export_dir is not None:
        side = read_sidecar(export_dir)
        shared, tok = load(export_dir, dtype=dtype, device=device, merge=False)  # the merge task turns it on
        base_src = model or side["base_model"].get("source")
        base, _ = load(base_src, dtype=dtype, device=device)
        if model_fingerprint(base) != side["base_model"]["fingerprint"]:
            raise KvtoolError("the base model found for this export has another fingerprint; pass --model BASE")
        return Variants(base, tok, shared.kvtool_plan, shared, base_src,
                        ["--model", str(export_dir), *dev_args])
    if not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    base_src = model if model is not None else plan.details.get("model")
    base, tok = load(base_src, dtype=dtype, device=device)
    if plan.model_fingerprint and model_fingerprint(base) != plan.model_fingerprint:
        raise KvtoolError("the plan was made for another model (fingerprint mismatch); pass the --model it was "
                          "searched on")
    from kvtool.kv_check import check_kv_in_effect
    from kvtool.runtime import apply_sharing, remove_sharing

    apply_sharing(base, plan)  # validates the plan for this model
    try:
        check_kv_in_effect(base)
    finally:
        remove_sharing(base)
    tmp = tempfile.mkdtemp(prefix="kvtool-eval-", dir=tmpdir)
    atexit.register(shutil.rmtree, tmp, True)
    plan_file = Path(tmp) / "plan.json"
    plan_file.write_text(plan.to_json())
    model_args = ["--model", base_src] if base_src else []
    return Variants(base, tok, plan, None, base_src, [*model_args, "--plan", str(plan_file), *dev_args])


def _dev(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


# ---- quality ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def quality(v: Variants, input_ids: torch.Tensor, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity of both variants and the shared one's fidelity to the base, one pass over ``input_ids``."""
    nll = {"base": 0.0, "shared": 0.0}
    kl = agree = cos = 0.0
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s : s + batch_size]
        outs = {}
        for which in ("base", "shared"):
            with v.use(which) as m:
                o = m(input_ids=ids.to(_dev(m)), use_cache=False, output_hidden_states=True)
                outs[which] = (torch.log_softmax(o.logits.float(), -1).cpu(), o.hidden_states[-1].float().cpu())
                lp = outs[which][0][:, :-1]
                nll[which] -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        (lp_b, h_b), (lp_s, h_s) = outs["base"], outs["shared"]
        kl += float((lp_b.exp() * (lp_b - lp_s)).sum(-1).sum())
        agree += float((lp_b.argmax(-1) == lp_s.argmax(-1)).float().sum())
        cos += float(nn.functional.cosine_similarity(h_b.flatten(1), h_s.flatten(1), dim=1).sum())
    n_pred = input_ids[:, 1:].numel()
    n_tok = input_ids.numel()
    ppl = {k: float(torch.tensor(x / n_pred).exp()) for k, x in nll.items()}
    return {"ppl": {"base": ppl["base"], "shared": ppl["shared"], "ratio": ppl["shared"] / ppl["base"],
                    "tokens": n_pred},
            "fidelity": {"kl": kl / n_tok, "top1_agreement": agree / n_tok, "hidden_cosine": cos / input_ids.shape[0]}}


@torch.no_grad()
def generations(v: Variants, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``prompts``: exact-match rate and mean common-prefix length vs the base."""
    from kvtool.generation import render

    tok = v.tokenizer
    rows = [render(tok, p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    conts = {}
    for which in ("base", "shared"):
        with v.use(which) as m:
            out = m.generate(ids.to(_dev(m)), attention_mask=mask.to(_dev(m)), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        conts[which] = [_strip(r[width:].tolist(), tok) for r in out.cpu()]
    exact = sum(a == b for a, b in zip(conts["base"], conts["shared"], strict=True)) / len(prompts)
    prefix = [_common_prefix(a, b) for a, b in zip(conts["base"], conts["shared"], strict=True)]
    samples = [{"prompt": p, "base": tok.decode(a), "shared": tok.decode(b)}
               for p, a, b in list(zip(prompts, conts["base"], conts["shared"], strict=True))[:5]]
    return {"prompts": len(prompts), "new_tokens": new_tokens, "exact_match": exact,
            "mean_common_prefix": sum(prefix) / len(prefix), "samples": samples}


def _strip(ids: list[int], tok) -> list[int]:
    stops = {tok.eos_token_id, tok.pad_token_id} - {None}
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k]
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def passkey(v: Variants, lengths, depths, variants: tuple[str, ...] = ("base", "shared")) -> dict[str, Any]:
    from kvtool.passkey import build_cases, passkey_accuracy

    cases = build_cases(v.tokenizer, lengths, depths)
    acc: dict[str, dict[str, float]] = {w: {} for w in variants}
    for which in variants:
        with v.use(which) as m:
            for length in lengths:
                acc[which][str(length)] = passkey_accuracy(m, v.tokenizer, [c for c in cases if c.length == length])
    return {"depths": list(depths), "accuracy": acc}


# ---- memory and speed ------------------------------------------------------------------------------------------------
def probe(args: list[str], s: EvalSettings) -> dict:
    cmd = [sys.executable, "-m", "kvtool.probe", *args, "--batch", str(s.speed_batch), "--prompt",
           str(s.speed_prompt), "--new", str(s.speed_new)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"the memory/speed probe failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory_speed(v: Variants, s: EvalSettings) -> dict[str, list[dict]]:
    base_args = ["--model", v.base_arg] if v.base_arg else []
    runs: dict[str, list[dict]] = {"base": [], "shared": []}
    for r in range(s.speed_repeats):
        for which in ("base", "shared") if r % 2 == 0 else ("shared", "base"):
            runs[which].append(probe(base_args if which == "base" else v.shared_args, s))
    for which, rs in runs.items():
        want = implied_kv_bytes(v, s, which)
        for run in rs:
            got = (run["kv_bytes_prefill"], run["kv_bytes"])
            if want is not None and got != want:
                raise KvtoolError(f"the {which} model's memory probe measured {got[0]:,} / {got[1]:,} KV bytes after "
                                  f"prefill / decode, but its plan implies {want[0]:,} / {want[1]:,}: refusing to "
                                  "report a KV figure the plan cannot produce")
    return runs


def implied_kv_bytes(v: Variants, s: EvalSettings, which: str) -> tuple[int, int] | None:
    """KV bytes after the probe's prefill and after its decode, as the plan (and its merge setting, which the probe's
    ``kvtool.load`` turns on) implies them for ``which`` variant."""
    from kvtool.archs import layer_types
    from kvtool.cache_size import stored_entries
    from kvtool.compression import CompressionSettings, layer_keep
    from kvtool.kv_check import entry_bytes

    cfg = v.base.config
    types = layer_types(cfg)
    src = list(range(cfg.num_hidden_layers)) if which == "base" else v.plan.kv_source_layers
    keep, thr = None, False
    if which == "shared" and v.plan.merge:
        cs = CompressionSettings.from_dict(v.plan.merge)
        keep, thr = layer_keep(cs, src, types), cs.budget is None
    per = entry_bytes(v.base, s.speed_batch)
    out = []
    for new in (0, s.speed_new):
        entries = stored_entries(src, types, getattr(cfg, "sliding_window", None), s.speed_prompt, new, keep, thr)
        if None in entries:  # KVMerger by threshold alone is data-dependent: the probe's own layer check stands
            return None
        out.append(sum(entries) * per)
    return out[0], out[1]


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def _trio(b: float, s: float) -> dict[str, float]:
    return {"base": b, "shared": s, "ratio": s / b if b else float("nan")}


# ---- the command -----------------------------------------------------------------------------------------------------
def evaluate(
    export_dir: str | Path | None = None,
    *,
    plan: SharingPlan | str | Path | None = None,
    model: str | None = None,
    tasks: tuple[str, ...] = TASKS,
    data: str | None = None,
    settings: EvalSettings | None = None,
    json_out: str | Path | None = None,
    plots: str | Path | None = None,
    stats: str | Path | None = None,
    lm_eval_tasks: list[str] | None = None,
    merge_budgets: list[float] | None = None,
    merge_methods: tuple[str, ...] | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a shared model side by side with its base; returns the report (and writes JSON/PNGs if asked)."""
    from kvtool.atomic import check_writable_file, write_json_atomic
    from kvtool.data import heldout_chunks
    from kvtool.versions import versions

    t0 = time.time()
    s = settings or EvalSettings()
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise KvtoolError(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    if json_out is not None:
        check_writable_file(json_out, force)
    say = log or (lambda msg: None)
    v = load_variants(export_dir, plan, model, dtype, device)
    report: dict[str, Any] = {
        "model": getattr(v.base, "kvtool_name", None),
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
        T["generate"] = generations(v, json.loads(_PROMPTS.read_text()), s.gen_new_tokens)
    if "passkey" in tasks:
        say(f"passkey retrieval at {', '.join(map(str, s.passkey_lengths))} tokens")
        T["passkey"] = passkey(v, s.passkey_lengths, s.passkey_depths)
    if "memory" in tasks or "speed" in tasks:
        say(f"memory and speed (batch {s.speed_batch} x {s.speed_prompt} prompt + {s.speed_new} new, "
            f"{s.speed_repeats} runs each, fresh processes)")
        runs = memory_speed(v, s)
        b, sh = runs["base"], runs["shared"]
        if "memory" in tasks:
            T["memory"] = {"kv_bytes": _trio(_median(b, "kv_bytes"), _median(sh, "kv_bytes")),
                           "kv_bytes_prefill": _trio(_median(b, "kv_bytes_prefill"), _median(sh, "kv_bytes_prefill")),
                           "peak_rss_mib": _trio(_median(b, "peak_rss_mib"), _median(sh, "peak_rss_mib"))}
            if "inference_rss_mib" in b[0]:
                T["memory"]["inference_rss_mib"] = _trio(_median(b, "inference_rss_mib"),
                                                         _median(sh, "inference_rss_mib"))
            if "peak_gpu_mib" in b[0]:
                T["memory"]["peak_gpu_mib"] = _trio(_median(b, "peak_gpu_mib"), _median(sh, "peak_gpu_mib"))
        if "speed" in tasks:
            T["speed"] = {"prefill_tok_s": _trio(_median(b, "prefill_tok_s"), _median(sh, "prefill_tok_s")),
                          "decode_tok_s": _trio(_median(b, "decode_tok_s"), _median(sh, "decode_tok_s")),
                          "device": str(_dev(v.base)), "runs": runs}
    if "merge" in tasks:
        from kvtool.compression import METHODS, CompressionSettings
        from kvtool.compression_eval import compare_compression

        plan_merge = CompressionSettings.from_dict(v.plan.merge) if v.plan.merge else None
        budgets = list(merge_budgets or ([plan_merge.budget] if plan_merge and plan_merge.budget else []))
        if budgets:
            say(f"KV merging vs eviction at budget {', '.join(map(str, budgets))} "
                f"(passkey at {s.merge_passkey_length}, long-context perplexity)")
            T["merge"] = compare_compression(
                v, budgets, tuple(merge_methods or METHODS), passkey_length=s.merge_passkey_length,
                passkey_depths=s.merge_passkey_depths, ppl_samples=s.merge_ppl_samples,
                ppl_context=s.merge_ppl_context, ppl_new=s.merge_ppl_new, data=data, base_settings=plan_merge,
                log=say)
    if lm_eval_tasks:
        T["lm_eval"] = run_lm_eval(v, lm_eval_tasks, say)
    if plots is not None:
        report["plots"] = _plots(v, Path(plots), stats, force)
    report["wall_time_s"] = round(time.time() - t0, 1)
    if json_out is not None:
        write_json_atomic(json_out, report)
    if export_dir is not None:
        _record_in_sidecar(Path(export_dir), report)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    T = report["tasks"]
    out: dict[str, Any] = {}
    if "ppl" in T:
        out.update(ppl_base=T["ppl"]["base"], ppl_shared=T["ppl"]["shared"])
    if "memory" in T:
        out["kv_bytes_ratio"] = T["memory"]["kv_bytes"]["ratio"]
    if "speed" in T:
        out["decode_speed_ratio"] = T["speed"]["decode_tok_s"]["ratio"]
    if "passkey" in T:
        out["passkey"] = T["passkey"]["accuracy"]
    return out


def _record_in_sidecar(path: Path, report: dict) -> None:
    """Keep the latest summary metrics in the export's kvtool.json (atomically)."""
    from kvtool.atomic import write_json_atomic

    side = json.loads((path / "kvtool.json").read_text())
    side["metrics"] = summary(report)
    write_json_atomic(path / "kvtool.json", side)


def run_lm_eval(v: Variants, tasks: list[str], say) -> dict[str, Any]:
    """lm-evaluation-harness on both variants through its HFLM wrapper, when it is installed."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        say("lm-evaluation-harness is not installed (pip install lm-eval); --lm-eval skipped")
        return {"skipped": "lm-evaluation-harness is not installed"}
    res: dict[str, Any] = {}
    for which in ("base", "shared"):
        with v.use(which) as m:
            try:
                out = simple_evaluate(model=HFLM(pretrained=m, tokenizer=v.tokenizer), tasks=tasks)
            except Exception as e:  # noqa: BLE001 - data not reachable, unknown task, ...
                say(f"lm-eval failed: {str(e).splitlines()[0][:200]}")
                return {"skipped": f"lm-eval failed: {str(e).splitlines()[0][:200]}"}
            res[which] = out.get("results", {})
    return res


def _plots(v: Variants, out: Path, stats: str | Path | None, force: bool) -> dict[str, str]:
    from kvtool.atomic import check_writable_file
    from kvtool.plots import distance_heatmap

    out.mkdir(parents=True, exist_ok=True)
    target = check_writable_file(out / "distance_map.png", force)
    if stats is not None:
        from kvtool.calibrate import CalibrationStats

        dist = CalibrationStats.load(stats).distance("euclidean")
    else:  # a small calibration pass of the base model is enough for the picture
        from kvtool.calibrate import collect_stats
        from kvtool.data import load_chunks

        dist = collect_stats(v.base, load_chunks(None, v.tokenizer, 8, 128).input_ids)["dist_euclidean"]
    distance_heatmap(dist.numpy(), target, title=f"{v.base.kvtool_name}: layer KV distance and the sharing map",
                     kv_source_layers=v.plan.kv_source_layers)
    return {"distance_map": str(target)}


@torch.no_grad()
def frontier(plans: list[str | Path], *, model: str | None = None, data: str | None = None,
             settings: EvalSettings | None = None, plots: str | Path | None = None, json_out: str | Path | None = None,
             force: bool = False, dtype: str | None = None, device: str | None = None, log=None) -> dict[str, Any]:
    """Perplexity and measured KV bytes of several plans on one base model; draws the quality-vs-memory frontier."""

    from kvtool.atomic import check_writable_file, write_json_atomic
    from kvtool.data import heldout_chunks
    from kvtool.kv_check import prefill_kv_bytes
    from kvtool.loading import load
    from kvtool.quality import perplexity
    from kvtool.runtime import sharing

    s = settings or EvalSettings()
    if json_out is not None:
        check_writable_file(json_out, force)
    loaded = [(str(p), SharingPlan.load(p)) for p in plans]
    base, tok = load(model if model is not None else loaded[0][1].details.get("model"), dtype=dtype, device=device)
    ids = heldout_chunks(tok, s.ppl_samples, s.ppl_seq_len, data).input_ids
    probe_ids = ids[:1].to(_dev(base))

    def measure(plan: SharingPlan) -> tuple[float, int]:
        with sharing(base, plan):
            ppl, _ = perplexity(base, ids)
            return ppl, prefill_kv_bytes(base, probe_ids)

    base_ppl, base_kv = measure(SharingPlan.identity(base.config.num_hidden_layers))
    rows = []
    for name, plan in loaded:
        ppl, kv = measure(plan)
        rows.append({"plan": name, "label": Path(name).stem, "consumers": len(plan.consumers), "ppl": ppl,
                     "ppl_ratio": ppl / base_ppl, "kv_ratio": kv / base_kv})
        if log:
            log(f"{name}: ppl {ppl:.2f} ({ppl / base_ppl:.2f}x base), KV {kv / base_kv:.3f} of base")
    report = {"model": base.kvtool_name, "base_ppl": base_ppl, "rows": rows}
    if plots is not None:
        from kvtool.plots import frontier as draw

        Path(plots).mkdir(parents=True, exist_ok=True)
        target = check_writable_file(Path(plots) / "frontier.png", force)
        draw(rows, target, base_ppl=base_ppl)
        report["plots"] = {"frontier": str(target)}
    if json_out is not None:
        write_json_atomic(json_out, report)
    return report
