"""Held-out quality against tokens trained: one ``kvtool heal`` run on the base model's own text, measured at
checkpoints along the way.

At every checkpoint (and before training, as 0 tokens): held-out perplexity (pydoc split, 8 × 256 tokens, the
number the README quotes) and greedy agreement with the base model (``kvtool eval``'s 20 prompts × 32 tokens, its
formula: mean common prefix, token agreement). The held-out numbers are read, never used to decide: early stopping
watches the generated validation split, as in ``kvtool heal``. Also prints the tokens/s of sampling the corpus and
of training. ``--schedule constant`` keeps the learning rate flat after warm-up, so that an early checkpoint is not
a run whose schedule was cut short.

    python bench/heal_curve.py --plan runs/plan.json --tokens 256000 --checkpoints 32000,77000,154000 \\
        --json docs/data/heal_curve.json [--plot docs/img/heal_curve.png] [--train attention] [--threads 2]
    python bench/heal_curve.py --redraw --json RUN.json --also OTHER.json --plot docs/img/heal_curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan")
    ap.add_argument("--tokens", type=int, default=256_000)
    ap.add_argument("--checkpoints", default="32000,77000,154000")
    ap.add_argument("--train", default="attention")
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--patience", type=int, default=10**6, help="validation passes without gain before stopping")
    ap.add_argument("--out", default=None, help="keep the healed export here (default: a temporary directory)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--also", action="append", default=[], help="another run's JSON to draw beside this one")
    ap.add_argument("--redraw", action="store_true", help="train nothing: draw --plot from --json and --also")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sample-batch", type=int, default=None,
                    help="rows sampled at once (a corpus shard; 32: a corpus written before 128 was the default)")
    a = ap.parse_args()
    if a.redraw:
        if not a.plot:
            ap.error("--redraw draws --plot")
        return draw(Path(a.plot), [Path(a.json), *map(Path, a.also)])
    if not a.plan:
        ap.error("--plan is required (or --redraw)")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import kvtool
    from kvtool.data.texts import eval_prompts, heldout_chunks
    from kvtool.evaluation.generations import generations
    from kvtool.evaluation.variants import Variants
    from kvtool.heal import HealSettings, heal
    from kvtool.metrics import perplexity

    model, tok = kvtool.load()
    reference, _ = kvtool.load()  # the base, untouched, for the greedy comparison
    held = heldout_chunks(tok).input_ids
    prompts = eval_prompts()
    base_ppl, _ = perplexity(model, held)
    plan = kvtool.SharingPlan.load(a.plan)

    def measure(tokens: int, m) -> dict:
        t0 = time.time()
        ppl, _ = perplexity(m, held)
        g = generations(Variants(reference, tok, plan, shared_model=m), prompts, 32)  # kvtool eval's formula
        row = {"ppl": ppl, "ppl_x_base": ppl / base_ppl,
               **{k: g[k] for k in ("exact_match", "mean_common_prefix", "token_agreement")},
               "measure_s": round(time.time() - t0, 1)}
        print(json.dumps({"tokens": tokens, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
        return row

    with kvtool.sharing(model, plan):
        start = {"tokens": 0, **measure(0, model)}
    out = a.out or tempfile.mkdtemp() + "/healed"
    s = HealSettings(tokens=a.tokens, train=a.train, schedule=a.schedule, lr=a.lr, patience=a.patience,
                     sample_batch=a.sample_batch)
    t0 = time.time()
    res = heal(plan, out=out, model=model, tokenizer=tok, settings=s, force=True, log=print,
               checkpoints=tuple(int(x) for x in a.checkpoints.split(",") if x), checkpoint=measure)
    final = {"tokens": res["tokens_trained"], **measure(res["tokens_trained"], kvtool.load(out)[0])}
    name = f"{a.train}, lr {a.lr:g}, {a.schedule}"
    doc = {"plan": plan.kv_source_layers, "settings": res["settings"], "base_ppl": base_ppl,
           "curve": [start, *res["curve"], final], "history": res["history"],
           "train_tokens_per_second": res["train_tokens_per_second"],
           "corpus_tokens_per_second": res["corpus_tokens_per_second"], "early_stop_at": res["early_stop_at"],
           "val_kl_before": res["val_kl_before"], "val_kl_after": res["val_kl_after"],
           "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "name": name, "export": out}
    Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.plot:
        draw(Path(a.plot), [Path(a.json), *map(Path, a.also)])
    print(json.dumps({k: doc[k] for k in ("train_tokens_per_second", "corpus_tokens_per_second", "seconds")}))


def draw(png: Path, runs: list[Path]) -> None:
    """One line per run's JSON, labelled with its name and token budget."""
    from kvtool.plots import heal_curve

    docs = [json.loads(r.read_text()) for r in runs]
    curves = {f"{d['name']}, {d['settings']['tokens']:,} tokens": d["curve"] for d in docs}
    png.write_bytes(heal_curve(curves, docs[0]["base_ppl"]))


if __name__ == "__main__":
    main()
