"""Incremental candidate scoring (from the stored hidden states at layer j) vs scoring from the embeddings.

Runs the same KVSharer search (SmolLM2, default calibration, target 0.3) both ways in one process, checks the plans
agree, and prints the time ratio.

    python bench/bench_search.py [--calib DIR] [--target 0.3]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib")
    ap.add_argument("--target", type=float, default=0.3)
    a = ap.parse_args()
    import kvtool
    from kvtool.calibration.calibrate import calibrate
    from kvtool.formats.stats import CalibrationStats
    from kvtool.search import search

    model, tok = kvtool.load()
    if a.calib:
        stats = CalibrationStats.load(a.calib)
    else:
        stats = calibrate(model, tokenizer=tok, out=tempfile.mkdtemp() + "/c")
    res = {}
    for inc in (True, False, True, False):
        t = time.perf_counter()
        r = search(stats, model=model, target=a.target, incremental=inc)
        res.setdefault(inc, []).append((time.perf_counter() - t, r.plan.kv_source_layers, len(r.tries)))
    fast = min(x[0] for x in res[True])
    slow = min(x[0] for x in res[False])
    assert res[True][0][1] == res[False][0][1], "incremental and full scoring disagree"
    print(f"SmolLM2-135M KVSharer search, target {a.target}, {res[True][0][2]} candidates: incremental "
          f"{fast:.1f} s, from embeddings {slow:.1f} s, speed-up {slow / fast:.2f}x (best of 2 each); same plan: yes")


if __name__ == "__main__":
    main()
