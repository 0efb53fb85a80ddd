"""Calibration overhead: collect_stats vs the same forward passes without collection, side by side.

    python bench/bench_calibrate.py [--samples 32] [--seq-len 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import kvtool
    from kvtool.calibration.calibrate import collect_stats
    from kvtool.data.texts import load_chunks

    model, tok = kvtool.load()
    ids = load_chunks(None, tok, a.samples, a.seq_len).input_ids

    @torch.no_grad()
    def plain():
        for s in range(0, ids.shape[0], 8):
            model.model(input_ids=ids[s : s + 8], use_cache=False)

    plain()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "calibrate": []}
    for r in range(a.repeats):
        for name in ("plain", "calibrate") if r % 2 == 0 else ("calibrate", "plain"):
            t = time.perf_counter()
            plain() if name == "plain" else collect_stats(model, ids)
            times[name].append(time.perf_counter() - t)
    p, c = statistics.median(times["plain"]), statistics.median(times["calibrate"])
    print(f"SmolLM2-135M, {a.samples}x{a.seq_len} tokens, median of {a.repeats}: plain forwards {p:.2f} s, "
          f"calibrate (collecting stats) {c:.2f} s, overhead ratio {c / p:.3f}")


if __name__ == "__main__":
    main()
