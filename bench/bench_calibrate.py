"""Calibration overhead: collect_stats vs the same forward passes without collection, side by side.

    python bench/bench_calibrate.py [--samples 32] [--seq-len 128] [--repeats 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import time

from common import alternate, ratio_spread, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="model (default: kvtool's, SmolLM2-135M)")
    a = ap.parse_args()
    import torch

    import kvtool
    from kvtool.calibration.calibrate import collect_stats
    from kvtool.data.texts import load_chunks
    from kvtool.io.loading import model_origin

    model, tok = kvtool.load(a.model)
    ids = load_chunks(None, tok, a.samples, a.seq_len).input_ids

    @torch.no_grad()
    def plain() -> None:
        for s in range(0, ids.shape[0], 8):
            model.model(input_ids=ids[s : s + 8], use_cache=False)

    def run(name: str) -> float:
        t = time.perf_counter()
        plain() if name == "plain" else collect_stats(model, ids)
        return time.perf_counter() - t

    plain()  # warm-up
    times = alternate(run, ("plain", "calibrate"), a.repeats)
    p, c, r = spread(times["plain"]), spread(times["calibrate"]), ratio_spread(times["plain"], times["calibrate"])
    print(f"{model_origin(model).name}, {a.samples}x{a.seq_len} tokens, median of {a.repeats}: plain forwards "
          f"{p.median:.2f} s, calibrate (collecting stats) {c.median:.2f} s, overhead ratio {r.median:.3f} "
          f"(rounds {r.low:.3f}–{r.high:.3f})")


if __name__ == "__main__":
    main()
