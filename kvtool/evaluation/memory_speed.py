"""Eval tasks ``memory`` and ``speed``.

``memory`` runs each variant in a fresh process (``kvtool.evaluation.probe``), alternating, so peak memory is its
own; every KV figure is checked against what the plan implies. ``speed`` times both variants in this process in
alternating rounds (one pair per round, so a busy machine slows both alike) and states the spread of the per-round
shared/base ratios: a ratio whose range holds 1.0 is reported as within noise, not as a gain or a loss.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from kvtool.crosslayer.kv_check import implied_bytes
from kvtool.errors import KvtoolError
from kvtool.evaluation.probe import measure
from kvtool.evaluation.task import EvalContext, EvalTask, Row, opt, ratio_spread, shown_ratio
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device
from kvtool.merging.hook import merge
from kvtool.merging.methods import MergeMethod, method_from_dict


def probe(args: list[str], batch: int, prompt: int, new: int) -> dict:
    """One run of ``kvtool.evaluation.probe`` in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", "kvtool.evaluation.probe", *args, "--batch", str(batch), "--prompt", str(prompt),
           "--new", str(new)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"the memory/speed probe failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_runs(v: Variants, batch: int, prompt: int, new: int, repeats: int) -> dict[str, list[dict]]:
    """``repeats`` probe runs per variant, alternating which goes first; refuses KV figures the plan cannot
    produce."""
    runs: dict[str, list[dict]] = {"base": [], "shared": []}
    for r in range(repeats):
        for which in ("base", "shared") if r % 2 == 0 else ("shared", "base"):
            runs[which].append(probe(v.base_args if which == "base" else v.shared_args, batch, prompt, new))
    for which, rs in runs.items():
        for run in rs:
            check_kv(v, which, run, batch, prompt, new)
    return runs


def check_kv(v: Variants, which: str, run: dict, batch: int, prompt: int, new: int) -> None:
    """Refuse a run whose KV bytes after prefill / decode are not what the plan (and its merge setting) implies."""
    want = implied_kv_bytes(v, which, batch, prompt, new)
    got = (run["kv_bytes_prefill"], run["kv_bytes"])
    if want is not None and got != want:
        raise KvtoolError(f"the {which} model's memory probe measured {got[0]:,} / {got[1]:,} KV bytes after "
                          f"prefill / decode, but its plan implies {want[0]:,} / {want[1]:,}: refusing to "
                          "report a KV figure the plan cannot produce")


def implied_kv_bytes(v: Variants, which: str, batch: int, prompt: int, new: int) -> tuple[int, int] | None:
    """KV bytes after the probe's prefill and after its decode, as the plan (and its merge setting, which the probe's
    ``kvtool.load`` turns on) implies them for ``which`` variant."""
    plan = None if which == "base" else v.plan
    merge_ = method_from_dict(v.plan.merge) if which == "shared" and v.plan.merge else None
    out = [implied_bytes(v.base, plan, merge_, batch, prompt, n) for n in (0, new)]
    return None if None in out else (out[0], out[1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def _trio(b: float, s: float) -> dict[str, float]:
    return {"base": b, "shared": s, "ratio": s / b if b else float("nan")}


@dataclass
class Memory(EvalTask):
    """KV-cache bytes (checked against the plan); with ``fresh``, process memory too, each variant in a fresh
    process."""

    name: ClassVar[str] = "memory"
    help: ClassVar[str] = "KV-cache bytes (and, fresh, process memory)"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"fresh": True, "repeats": 2}
    batch: int = opt(4, "sequences per batch", min=1)
    prompt: int = opt(512, "prompt tokens", min=8)
    new: int = opt(32, "generated tokens", min=1)
    fresh: bool = opt(False, "measure in fresh processes, adding process memory (RSS, GPU) rows")
    repeats: int = opt(1, "fresh-process runs per variant (medians)", min=1)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        v = ctx.v
        where = (f"{self.repeats} fresh process{'es' * (self.repeats > 1)} per variant" if self.fresh else
                 "in this process")
        ctx.log(f"memory (batch {self.batch} x {self.prompt} prompt + {self.new} new, {where})")
        if self.fresh:
            runs = probe_runs(v, self.batch, self.prompt, self.new, self.repeats)
        else:  # KV bytes only: process memory here holds both models and the other tasks' leftovers
            runs = {w: [_timed(v, w, ctx.plan_merge if w == "shared" else None, self.batch, self.prompt, self.new)]
                    for w in ("base", "shared")}
            for w, rs in runs.items():
                check_kv(v, w, rs[0], self.batch, self.prompt, self.new)
                rs[0] = {k: rs[0][k] for k in ("kv_bytes", "kv_bytes_prefill")}
        b, sh = runs["base"], runs["shared"]
        return {k: _trio(_median(b, k), _median(sh, k))
                for k in ("kv_bytes", "kv_bytes_prefill", "peak_rss_mib", "inference_rss_mib", "peak_gpu_mib")
                if k in b[0]}

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        return {"kv_bytes_ratio": result["kv_bytes"]["ratio"]}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        m = result
        f = lambda x, d: f"{x:,.{d}f}"  # noqa: E731
        rows = [("KV cache MiB (prefill+decode)", f(m["kv_bytes"]["base"] / 2**20, 1),
                 f(m["kv_bytes"]["shared"] / 2**20, 1), f(m["kv_bytes"]["ratio"], 4))]
        labels = {"inference_rss_mib": "RSS growth in inference MiB", "peak_rss_mib": "peak process RSS MiB",
                  "peak_gpu_mib": "peak GPU MiB"}
        for key, label in labels.items():
            if key in m:
                rows.append((label, f(m[key]["base"], 0), f(m[key]["shared"], 0), f(m[key]["ratio"], 3)))
        return rows


@dataclass
class Speed(EvalTask):
    """Prefill and decode tokens/s of both variants, timed in alternating rounds with the spread stated."""

    name: ClassVar[str] = "speed"
    help: ClassVar[str] = "prefill and decode tokens/s, alternating rounds, spread stated"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"repeats": 7}
    batch: int = opt(4, "sequences per batch", min=1)
    prompt: int = opt(256, "prompt tokens", min=8)
    new: int = opt(32, "generated tokens", min=1)
    repeats: int = opt(3, "timed rounds (one base and one shared run each)", min=1)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        v, plan_merge = ctx.v, ctx.plan_merge
        ctx.log(f"speed (batch {self.batch} x {self.prompt} prompt + {self.new} new, {self.repeats} alternating "
                "rounds)")
        runs: dict[str, list[dict]] = {"base": [], "shared": []}
        for r in range(self.repeats + 1):  # round 0 warms both up and is not counted
            for which in ("base", "shared") if r % 2 == 0 else ("shared", "base"):
                res = _timed(v, which, plan_merge if which == "shared" else None, self.batch, self.prompt, self.new)
                if r:
                    runs[which].append({k: res[k] for k in ("prefill_s", "decode_s", "prefill_tok_s",
                                                            "decode_tok_s")})
        out: dict[str, Any] = {"device": str(model_device(v.base)), "rounds": self.repeats}
        for key in ("prefill_tok_s", "decode_tok_s"):
            b, s = [x[key] for x in runs["base"]], [x[key] for x in runs["shared"]]
            out[key] = {"base": statistics.median(b), "shared": statistics.median(s), **ratio_spread(b, s)}
        out["runs"] = runs
        return out

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        d = result["decode_tok_s"]
        return {"decode_speed_ratio": d["ratio"], "decode_speed_within_noise": d.get("within_noise", False)}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        rows = []
        for key, label, digits in (("prefill_tok_s", f"prefill tokens/s ({result['device']})", 0),
                                   ("decode_tok_s", "decode tokens/s", 1)):
            r = result[key]
            ratio = shown_ratio(r) if "pairs" in r else f"{r['ratio']:.3f}"  # older reports: no spread
            rows.append((label, f"{r['base']:,.{digits}f}", f"{r['shared']:,.{digits}f}", ratio))
        return rows


def _timed(v: Variants, which: str, merge_: MergeMethod | None, batch: int, prompt: int, new: int) -> dict:
    with v.use(which) as m, merge(m, merge_) if merge_ is not None else contextlib.nullcontext():
        return measure(m, batch, prompt, new)
