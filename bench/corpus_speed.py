"""Sampling speed of the heal corpus against the number of rows sampled at once (``HealSettings.sample_batch``,
one corpus shard): the base model writes a shard of plain-prompt rows at each batch size, the sizes alternating
round by round (``common.alternate``), and the script prints tokens/s per size and each size's ratio to the first,
with the range of the per-round ratios.

    python bench/corpus_speed.py --batches 32,128 [--rounds 3] [--seq-len 256] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from common import alternate, ratio_spread, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import kvtool
    from kvtool.calibration.corpus import CorpusSettings, _PromptSource, sample_shard

    model, tok = kvtool.load()
    model.eval()
    sizes = [int(b) for b in a.batches.split(",")]
    base = CorpusSettings(seq_len=a.seq_len)

    def run(name: str) -> float:
        s = replace(base, batch_size=int(name))
        prompts = _PromptSource(tok, s).batch(0)  # shard 0: plain snippets, all of the same length
        t0 = time.perf_counter()
        ids, mask, _, _ = sample_shard(model, tok, prompts, s, seed=0)
        sampled = int(mask.sum()) - sum(len(p) for p in prompts)
        rate = sampled / (time.perf_counter() - t0)
        print(f"  batch {name}: {sampled:,} tokens at {rate:.0f} tokens/s", flush=True)
        return rate

    rates = alternate(run, [str(b) for b in sizes], repeats=a.rounds)
    first = rates[str(sizes[0])]
    rows = {}
    for b in sizes:
        r = rates[str(b)]
        ratio = ratio_spread(first, r)
        rows[b] = {"tokens_per_second": spread(r).to_dict(), "ratio_to_first": ratio.to_dict()}
        print(f"batch {b:>4}: {spread(r).median:.0f} tokens/s ({min(r):.0f}–{max(r):.0f}), "
              f"{ratio.median:.2f}× batch {sizes[0]} ({ratio.low:.2f}–{ratio.high:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps({"seq_len": a.seq_len, "threads": torch.get_num_threads(),
                                            "rounds": a.rounds, "batches": rows}, indent=1))


if __name__ == "__main__":
    main()
