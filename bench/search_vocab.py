"""How search time scales with the vocabulary: a tiny Llama (random weights) with vocabularies of 32k to 262k tokens,
the same calibration size and search, one process. Per vocabulary: search seconds and its phases (layer forwards,
LM head, KL). The LM head and the KL normaliser read the whole vocabulary for every candidate, so they grow with it;
the layer forwards do not.

    python bench/search_vocab.py [--vocab 32000 --vocab 131072 --vocab 262144] [--layers 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json

from common import timed_search


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, action="append")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch

    from kvtool.calibration.calibrate import collect_stats
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.fingerprint import model_fingerprint
    from kvtool.io.tiny import tiny_model

    torch.set_num_threads(2)
    rows = []
    for vocab in a.vocab or [32000, 131072, 262144]:
        m = tiny_model("llama", vocab_size=vocab, num_hidden_layers=a.layers, hidden_size=a.hidden,
                       intermediate_size=4 * a.hidden, num_attention_heads=a.hidden // 64, num_key_value_heads=1)
        ids = torch.randint(3, vocab, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
        meta = {"version": 1, "model_name": f"tiny-{vocab}", "model": None, "model_fingerprint": model_fingerprint(m),
                "num_layers": a.layers, "layer_types": ["full_attention"] * a.layers, "data": "random",
                "data_hash": "-", "samples": a.samples, "seq_len": a.seq_len, "seed": 0}
        stats = CalibrationStats(collect_stats(m, ids), meta)
        r, secs = timed_search(stats, m, target=0.3, threshold=100.0)
        rows.append({"vocab": vocab, "seconds": round(secs, 2), "candidates": len(r.tries),
                     "phases": {k: round(v, 2) for k, v in r.phases.items()}})
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'vocab':>8} {'search s':>9} {'per cand.':>10} {'layers':>7} {'LM head':>8} {'KL':>6}")
    for r in rows:
        ph = r["phases"]
        print(f"{r['vocab']:>8} {r['seconds']:>9.2f} {r['seconds'] / r['candidates']:>10.3f} "
              f"{ph.get('layers', 0):>7.2f} {ph.get('lm_head', 0):>8.2f} {ph.get('metric', 0):>6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
