"""Sharing runtime on SmolLM2 with a 9-consumer (30%) plan vs the unpatched model, side by side in one run.

Each measurement runs in its own subprocess (so peak RSS is per variant), alternating base/shared.
Prints KV-cache bytes ratio, peak RSS, prefill time ratio and decode tokens/s ratio.

    python bench/bench_runtime.py [--batch 8] [--prompt 1024] [--new 128] [--repeats 2] [--plan plan.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def worker(variant: str, batch: int, prompt: int, new: int, plan_path: str | None) -> dict:
    import torch

    import kvtool
    from kvtool.crosslayer.archs import layer_types
    from kvtool.evaluation.probe import measure
    from kvtool.search.layouts import layout_plan

    torch.manual_seed(0)
    model, _ = kvtool.load()
    plan = kvtool.SharingPlan.load(plan_path) if plan_path else layout_plan("adjacent", layer_types(model.config), 9)
    if variant == "shared":
        kvtool.apply_sharing(model, plan, drop_unused=True)
    res = measure(model, batch, prompt, new)
    return {"variant": variant, "consumers": len(plan.consumers), "kv_bytes": res["kv_bytes"],
            "prefill_s": res["prefill_s"], "decode_tok_s": res["decode_tok_s"], "peak_rss_mb": res["peak_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--plan")
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.batch, a.prompt, a.new, a.plan)))
        return
    runs: dict[str, list[dict]] = {"base": [], "shared": []}
    for r in range(a.repeats):
        for v in ("base", "shared") if r % 2 == 0 else ("shared", "base"):
            cmd = [sys.executable, __file__, "--worker", v, "--batch", str(a.batch), "--prompt", str(a.prompt),
                   "--new", str(a.new)] + (["--plan", a.plan] if a.plan else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            runs[v].append(res)
            print(f"  run {r} {v:6s} prefill {res['prefill_s']:.2f} s  decode {res['decode_tok_s']:.1f} tok/s  "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("kv_bytes", "prefill_s", "decode_tok_s",
                                                                  "peak_rss_mb")} for v, rs in runs.items()}
    b, s = med["base"], med["shared"]
    print(f"SmolLM2-135M, {runs['shared'][0]['consumers']}/30 consumers, batch {a.batch} x {a.prompt} prompt + "
          f"{a.new} new tokens, CPU, median of {a.repeats}")
    print(f"KV bytes           base {b['kv_bytes'] / 2**20:.1f} MiB  shared {s['kv_bytes'] / 2**20:.1f} MiB  "
          f"ratio {s['kv_bytes'] / b['kv_bytes']:.4f}")
    print(f"peak RSS           base {b['peak_rss_mb']:.0f} MB  shared {s['peak_rss_mb']:.0f} MB  "
          f"ratio {s['peak_rss_mb'] / b['peak_rss_mb']:.3f}")
    print(f"prefill time       base {b['prefill_s']:.2f} s  shared {s['prefill_s']:.2f} s  "
          f"ratio {s['prefill_s'] / b['prefill_s']:.3f}")
    print(f"decode tokens/s    base {b['decode_tok_s']:.1f}  shared {s['decode_tok_s']:.1f}  "
          f"ratio {s['decode_tok_s'] / b['decode_tok_s']:.3f}")


if __name__ == "__main__":
    main()
