"""Search speed and map quality, several search settings side by side in one process (the machine is noisy, so
compare rows of one run). For each setting: wall time, time per phase (local error scores, layer forwards, LM head,
KL), the map, its calibration KL and its held-out perplexity (pydoc split).

    python bench/search_speed.py [--calib DIR] [--target 0.3] [--variant NAME=k=v,k=v ...]

Default variants: the search as it was (the model's own float32, batch 16) and today's default (bfloat16 scoring on a
CPU that runs it natively, batch 32).
"""

from __future__ import annotations

import argparse
import json
import time


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, kv = text.partition("=")
    out: dict = {}
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition(":")
        out[k] = json.loads(v)
    return name, out


def pick_methods(defaults: dict[str, dict], specs: list[str], only: str | None) -> dict[str, dict]:
    """``defaults`` plus the ``NAME=k:v,...`` variants in ``specs``, narrowed to the comma-separated ``only``."""
    methods = {**defaults, **dict(parse_variant(m) for m in specs)}
    return {k: methods[k] for k in only.split(",")} if only else methods


DEFAULTS = ['fp32-b16=precision:"model",batch_size:16', "default="]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", help="calibration directory (default: calibrate the embedded model here)")
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--variant", action="append", help="NAME=key:value,key:value (SearchSettings fields)")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    import kvtool
    from kvtool.crosslayer.runtime import sharing
    from kvtool.data.texts import heldout_chunks
    from kvtool.formats.stats import CalibrationStats
    from kvtool.metrics import perplexity
    from kvtool.search import search
    from kvtool.search.compare import calibration_metrics

    torch.set_num_threads(2)
    model, tok = kvtool.load()
    stats = CalibrationStats.load(a.calib) if a.calib else kvtool.calibrate(model, tokenizer=tok)
    heldout = heldout_chunks(tok).input_ids
    base_ppl, _ = perplexity(model, heldout)
    rows = []
    for name, kw in map(parse_variant, a.variant or DEFAULTS):
        t = time.perf_counter()
        r = search(stats, model=model, target=a.target, **kw)
        secs = time.perf_counter() - t
        _, kl = calibration_metrics(model, stats, r.plan)
        with sharing(model, r.plan):
            ppl, _ = perplexity(model, heldout)
        rows.append({"variant": name, "settings": kw, "seconds": round(secs, 1),
                     "phases": {k: round(v, 1) for k, v in r.phases.items()}, "calib_kl": round(kl, 4),
                     "heldout_ppl": round(ppl, 2), "ppl_ratio": round(ppl / base_ppl, 3),
                     "map": r.plan.describe()})
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'variant':<16} {'s':>6} {'local':>6} {'layers':>7} {'head':>6} {'KL':>6} {'calib KL':>9} {'ppl':>7} "
          f"{'x base':>7}")
    for r in rows:
        ph = r["phases"]
        print(f"{r['variant']:<16} {r['seconds']:>6.1f} {ph.get('local_errors', 0):>6.1f} "
              f"{ph.get('layers', 0):>7.1f} {ph.get('lm_head', 0):>6.1f} {ph.get('metric', 0):>6.1f} "
              f"{r['calib_kl']:>9.4f} {r['heldout_ppl']:>7.2f} {r['ppl_ratio']:>7.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"base_ppl": base_ppl, "target": a.target, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
