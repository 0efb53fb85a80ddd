"""Search speed and map quality, several search settings side by side in one process (the machine is noisy, so
compare rows of one run). For each setting: wall time, time per phase (local error scores, layer forwards, LM head,
KL), the map, its calibration KL and its held-out perplexity (pydoc split).

    python bench/search_speed.py [--calib DIR] [--target 0.3] [--variant NAME=k:v,k:v ...]

Default variants: the search as it was (the model's own float32, batch 16) and today's default (bfloat16 scoring on a
CPU that runs it natively, batch 32).
"""

from __future__ import annotations

import argparse
import json

from common import parse_variant, score_plan, timed_search

DEFAULTS = ['fp32-b16=precision:"model",batch_size:16', "default="]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", help="calibration directory (default: calibrate the embedded model here)")
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--variant", action="append", help="NAME=key:value,key:value (SearchSettings fields)")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    import kvtool
    from kvtool.data.texts import heldout_chunks
    from kvtool.formats.stats import CalibrationStats
    from kvtool.metrics import perplexity

    torch.set_num_threads(2)
    stats = CalibrationStats.load(a.calib) if a.calib else None
    model, tok = kvtool.load(None if stats is None else stats.meta.get("model"))
    stats = stats or kvtool.calibrate(model, tokenizer=tok)
    heldout = heldout_chunks(tok).input_ids
    base_ppl, _ = perplexity(model, heldout)
    rows = []
    for name, kw in map(parse_variant, a.variant or DEFAULTS):
        r, secs = timed_search(stats, model, target=a.target, **kw)
        sc = score_plan(model, tok, r.plan, heldout, stats=stats)
        rows.append({"variant": name, "settings": kw, "seconds": round(secs, 1),
                     "phases": {k: round(v, 1) for k, v in r.phases.items()}, "calib_kl": round(sc["calib_kl"], 4),
                     "heldout_ppl": round(sc["ppl"], 2), "ppl_ratio": round(sc["ppl"] / base_ppl, 3),
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
