"""Incremental candidate scoring (from the stored hidden states at layer j) vs scoring from the embeddings.

Runs the same KVSharer search (SmolLM2, default calibration, target 0.3) both ways in one process, alternating,
checks the plans agree, and prints the time ratio.

    python bench/bench_search.py [--calib DIR] [--target 0.3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile

from common import alternate, ratio_spread, timed_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib")
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import kvtool
    from kvtool.calibration.calibrate import calibrate
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.loading import model_origin

    stats = CalibrationStats.load(a.calib) if a.calib else None
    model, tok = kvtool.load(None if stats is None else stats.meta.get("model"))
    if stats is None:
        stats = calibrate(model, tokenizer=tok, out=tempfile.mkdtemp() + "/c")

    def run(how: str):
        r, secs = timed_search(stats, model, target=a.target, incremental=how == "incremental")
        return secs, r.plan.kv_source_layers, len(r.tries)

    res = alternate(run, ("incremental", "full"), a.repeats)
    inc, full = res["incremental"], res["full"]
    assert all(x[1] == inc[0][1] for x in inc + full), "incremental and full scoring disagree"
    fast, slow = min(x[0] for x in inc), min(x[0] for x in full)
    r = ratio_spread([x[0] for x in inc], [x[0] for x in full])
    print(f"{model_origin(model).name} KVSharer search, target {a.target}, {inc[0][2]} candidates: "
          f"incremental {fast:.1f} s, from embeddings {slow:.1f} s, speed-up {slow / fast:.2f}x (best of "
          f"{a.repeats} each; rounds {r.low:.2f}–{r.high:.2f}x); same plan: yes")


if __name__ == "__main__":
    main()
