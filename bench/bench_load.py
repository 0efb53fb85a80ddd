"""Loading an export (kvtool.load, sharing on, strict checks) vs a plain from_pretrained of the base, side by side.

    python bench/bench_load.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvtool
    from kvtool.crosslayer.archs import layer_types
    from kvtool.io.export import export
    from kvtool.io.loading import resolve_model
    from kvtool.search.layouts import layout_plan

    base_dir, _ = resolve_model(None)
    model, tok = kvtool.load()
    plan = layout_plan("adjacent", layer_types(model.config), 9)
    out = tempfile.mkdtemp() + "/exp"
    export(plan, model=model, tokenizer=tok, out=out)
    del model
    times: dict[str, list[float]] = {"base": [], "export": []}
    for r in range(a.repeats + 1):
        for name in ("base", "export") if r % 2 == 0 else ("export", "base"):
            t = time.perf_counter()
            if name == "base":
                AutoModelForCausalLM.from_pretrained(base_dir)
                AutoTokenizer.from_pretrained(base_dir)
            else:
                kvtool.load(out)
            if r:  # first round is warm-up (page cache)
                times[name].append(time.perf_counter() - t)
    b, e = statistics.median(times["base"]), statistics.median(times["export"])
    print(f"SmolLM2-135M, 9-consumer export: plain from_pretrained of the base (model + tokenizer) {b:.3f} s, "
          f"kvtool.load(export) (model + tokenizer, strict checks, fingerprint) {e:.3f} s, ratio {e / b:.2f} "
          f"(median of {a.repeats})")


if __name__ == "__main__":
    main()
