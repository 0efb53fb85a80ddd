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

import torch
from common import score_plan, timed_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", required=True)
    ap.add_argument("--targets", default="0.1,0.2,0.3")
    ap.add_argument("--orders", default="dissimilar,similar,random,local,best-first")
    ap.add_argument("--heal-targets", default="")
    ap.add_argument("--heal-orders", default="")
    ap.add_argument("--heal-tokens", type=int, default=256_000)
    ap.add_argument("--pool", type=int, default=4, help="best-first candidate pool")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import kvtool
    from kvtool.data.passkey import build_cases
    from kvtool.data.texts import heldout_chunks
    from kvtool.evaluation.passkey import passkey_accuracy
    from kvtool.formats.stats import CalibrationStats
    from kvtool.heal import HealSettings, heal
    from kvtool.metrics import perplexity

    stats = CalibrationStats.load(a.calib)
    model, tok = kvtool.load(stats.meta.get("model"))
    held = heldout_chunks(tok).input_ids
    cases = build_cases(tok, (1024,), (0.1, 0.5, 0.9))
    base_ppl, _ = perplexity(model, held)
    base_pk = passkey_accuracy(model, tok, cases)
    rows = []

    def measure(plan, m=model, t=tok, st=stats) -> dict:
        """``score_plan``'s calibration cosine/KL (with ``st``), held-out perplexity and passkey@1024."""
        sc = score_plan(m, t, plan, held, stats=st, cases=cases)
        return {**({"calib_cosine": sc["calib_cosine"], "calib_kl": sc["calib_kl"]} if st is not None else {}),
                "ppl": sc["ppl"], "ppl_x_base": sc["ppl"] / base_ppl, "passkey_1024": sc["passkey"]}

    heal_t = {float(x) for x in a.heal_targets.split(",") if x}
    heal_o = set(a.heal_orders.split(",")) if a.heal_orders else None
    for target in [float(x) for x in a.targets.split(",")]:
        for order in a.orders.split(","):
            r, secs = timed_search(stats, model, target=target, order=order, pool=a.pool)
            row = {"target": target, "order": order, "consumers": len(r.plan.consumers), "search_s": secs,
                   "validate": r.plan.details.get("validate"), "kv_source_layers": r.plan.kv_source_layers,
                   **measure(r.plan)}
            if target in heal_t and (heal_o is None or order in heal_o):
                out = tempfile.mkdtemp() + "/healed"
                fresh, ftok = kvtool.load(stats.meta.get("model"))
                h = heal(r.plan, out=out, model=fresh, tokenizer=ftok, settings=HealSettings(tokens=a.heal_tokens))
                hm, ht = kvtool.load(out)
                torch.manual_seed(0)
                row["heal"] = {**measure(None, hm, ht, None), "seconds": h["seconds"], "steps_run": h["steps_run"]}
            rows.append(row)
            print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()
                              if k != "kv_source_layers"}), flush=True)
            with open(a.json, "w") as f:
                json.dump({"base_ppl": base_ppl, "base_passkey_1024": base_pk, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
