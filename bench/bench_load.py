"""Loading an export (kvtool.load, sharing on, strict checks) vs a plain from_pretrained of the base, side by side.

    python bench/bench_load.py [--repeats 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import alternate, ratio_spread, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", help="base model (default: kvtool's, SmolLM2-135M)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvtool
    from kvtool.crosslayer.archs import layer_types
    from kvtool.io.export import export
    from kvtool.io.loading import model_origin, resolve_model
    from kvtool.search.layouts import layout_plan

    base_dir, _ = resolve_model(a.model)
    model, tok = kvtool.load(a.model)
    name = model_origin(model).name
    L = model.config.num_hidden_layers
    plan = layout_plan("adjacent", layer_types(model.config), round(0.3 * L))
    out = tempfile.mkdtemp() + "/exp"
    export(plan, model=model, tokenizer=tok, out=out)
    del model

    def load(name: str) -> float:
        t = time.perf_counter()
        if name == "base":
            AutoModelForCausalLM.from_pretrained(base_dir)
            AutoTokenizer.from_pretrained(base_dir)
        else:
            kvtool.load(out)
        return time.perf_counter() - t

    times = alternate(load, ("base", "export"), a.repeats, warmup=1)  # the warm-up round fills the page cache
    b, e, r = spread(times["base"]), spread(times["export"]), ratio_spread(times["base"], times["export"])
    print(f"{name}, {len(plan.consumers)}-consumer export: plain from_pretrained of the base (model + tokenizer) "
          f"{b.median:.3f} s, kvtool.load(export) (model + tokenizer, strict checks, fingerprint) {e.median:.3f} s, "
          f"ratio {r.median:.2f} (median of {a.repeats}; rounds {r.low:.2f}–{r.high:.2f})")


if __name__ == "__main__":
    main()
