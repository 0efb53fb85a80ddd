"""The order × target (× heal) table of docs/RESULTS.md, on the embedded SmolLM2, in one run.

For each target and order: search (timed), then held-out pydoc perplexity, calibration KL, passkey accuracy at
1024 tokens; with --heal, the same after `kvtool heal` of that plan.

    python bench/results_table.py --calib DIR [--targets 0.1,0.2,0.3] [--orders ...] [--heal-targets 0.3]
                                  [--heal-tokens 256000] --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--targets", default="0.1,0.2,0.3")
    ap.add_argument("--orders", default="dissimilar,similar,random,local,best-first")
    ap.add_argument("--heal-targets", default="")
    ap.add_argument("--heal-orders", default="")
    ap.add_argument("--heal-tokens", type=int, default=256_000)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import kvtool
    from kvtool.crosslayer.runtime import active_plan
    from kvtool.data.texts import heldout_chunks
    from kvtool.evaluation.passkey import passkey
    from kvtool.evaluation.variants import Variants
    from kvtool.formats.stats import CalibrationStats
    from kvtool.heal import HealSettings, heal
    from kvtool.metrics import perplexity
    from kvtool.search import search
    from kvtool.search.compare import calibration_metrics

    stats = CalibrationStats.load(a.calib)
    model, tok = kvtool.load()
    held = heldout_chunks(tok).input_ids
    base_ppl, _ = perplexity(model, held)
    v = Variants(model, tok, kvtool.SharingPlan.identity(30))
    base_pk = passkey(v, (1024,), (0.1, 0.5, 0.9), ("base",))["accuracy"]["base"]["1024"]
    rows = []

    def measure(plan, m=model, t=tok):
        cos, kl = calibration_metrics(m, stats, plan)
        vv = Variants(m, t, plan)
        with kvtool.sharing(m, plan):
            ppl, _ = perplexity(m, held)
        pk = passkey(vv, (1024,), (0.1, 0.5, 0.9), ("shared",))["accuracy"]["shared"]["1024"]
        return {"calib_cosine": cos, "calib_kl": kl, "ppl": ppl, "ppl_x_base": ppl / base_ppl, "passkey_1024": pk}

    heal_t = {float(x) for x in a.heal_targets.split(",") if x}
    heal_o = set(a.heal_orders.split(",")) if a.heal_orders else None
    for target in [float(x) for x in a.targets.split(",")]:
        for order in a.orders.split(","):
            t0 = time.time()
            r = search(stats, model=model, target=target, order=order, beam=a.beam)
            secs = time.time() - t0
            row = {"target": target, "order": order, "consumers": len(r.plan.consumers), "search_s": secs,
                   "validate": r.plan.details.get("validate"), "kv_source_layers": r.plan.kv_source_layers,
                   **measure(r.plan)}
            if target in heal_t and (heal_o is None or order in heal_o):
                out = tempfile.mkdtemp() + "/healed"
                fresh, ftok = kvtool.load()
                h = heal(r.plan, out=out, model=fresh, tokenizer=ftok, settings=HealSettings(tokens=a.heal_tokens))
                hm, ht = kvtool.load(out)
                torch.manual_seed(0)
                ppl_h, _ = perplexity(hm, held)
                vv = Variants(hm, ht, active_plan(hm), shared_model=hm)
                pk = passkey(vv, (1024,), (0.1, 0.5, 0.9), ("shared",))["accuracy"]["shared"]["1024"]
                row["heal"] = {"ppl": ppl_h, "ppl_x_base": ppl_h / base_ppl, "seconds": h["seconds"],
                               "steps_run": h["steps_run"], "passkey_1024": pk}
            rows.append(row)
            print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()
                              if k != "kv_source_layers"}), flush=True)
            with open(a.json, "w") as f:
                json.dump({"base_ppl": base_ppl, "base_passkey_1024": base_pk, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
