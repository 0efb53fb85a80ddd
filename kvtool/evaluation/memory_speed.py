"""Eval tasks ``memory`` and ``speed``: each variant measured in a fresh process (``kvtool.evaluation.probe``),
alternating, so peak memory and timings are its own; every KV figure is checked against what the plan implies."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from kvtool.crosslayer.kv_check import implied_bytes
from kvtool.errors import KvtoolError
from kvtool.evaluation.variants import EvalSettings, Variants
from kvtool.io.devices import model_device
from kvtool.merging.methods import method_from_dict


def probe(args: list[str], batch: int, prompt: int, new: int) -> dict:
    """One run of ``kvtool.evaluation.probe`` in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", "kvtool.evaluation.probe", *args, "--batch", str(batch), "--prompt", str(prompt),
           "--new", str(new)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"the memory/speed probe failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_runs(v: Variants, s: EvalSettings) -> dict[str, list[dict]]:
    """``speed_repeats`` probe runs per variant, alternating which goes first; refuses KV figures the plan cannot
    produce."""
    base_args = v.base_args
    runs: dict[str, list[dict]] = {"base": [], "shared": []}
    for r in range(s.speed_repeats):
        for which in ("base", "shared") if r % 2 == 0 else ("shared", "base"):
            runs[which].append(probe(base_args if which == "base" else v.shared_args, s.speed_batch, s.speed_prompt,
                                     s.speed_new))
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
    plan = None if which == "base" else v.plan
    merge = method_from_dict(v.plan.merge) if which == "shared" and v.plan.merge else None
    out = [implied_bytes(v.base, plan, merge, s.speed_batch, s.speed_prompt, new) for new in (0, s.speed_new)]
    return None if None in out else (out[0], out[1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def _trio(b: float, s: float) -> dict[str, float]:
    return {"base": b, "shared": s, "ratio": s / b if b else float("nan")}


def memory_speed(v: Variants, s: EvalSettings, tasks: tuple[str, ...]) -> dict[str, Any]:
    """The ``memory`` and/or ``speed`` entries of the report (medians over the runs)."""
    runs = probe_runs(v, s)
    b, sh = runs["base"], runs["shared"]
    out: dict[str, Any] = {}
    if "memory" in tasks:
        out["memory"] = {k: _trio(_median(b, k), _median(sh, k))
                         for k in ("kv_bytes", "kv_bytes_prefill", "peak_rss_mib", "inference_rss_mib",
                                   "peak_gpu_mib") if k in b[0]}
    if "speed" in tasks:
        out["speed"] = {"prefill_tok_s": _trio(_median(b, "prefill_tok_s"), _median(sh, "prefill_tok_s")),
                        "decode_tok_s": _trio(_median(b, "decode_tok_s"), _median(sh, "decode_tok_s")),
                        "device": str(model_device(v.base)), "runs": runs}
    return out
