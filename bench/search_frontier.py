"""Map quality against KV bytes removed, for several search methods at several targets, on one calibration.

For each method and target: ``kvtool.search`` (timed), then the map's held-out perplexity (pydoc split, 8 × 256
tokens: the number the README quotes), its calibration KL and cosine (float32, ``search.compare.calibration_metrics``),
passkey accuracy at 1024 tokens (5 depths), and the KV bytes measured after a prefill (checked against the plan).
Rows are appended to ``--json`` as they finish, so an interrupted run resumes where it stopped. ``--plot`` draws one
line per method.

    python bench/search_frontier.py --calib DIR --json docs/data/search_frontier.json [--plot docs/img/f.png]
        [--targets 0.1,0.2,0.3,0.4,0.5] [--method NAME=k:v,k:v ...] [--only NAME,...] [--also other.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import pick_methods, score_plan, timed_search

METHODS = {
    "layer path": {},
    "layer path + refine 16": {"refine": 16},
    "layer beam 4": {"beam_width": 4},
    "tensor path": {"granularity": "tensor"},
    "tensor path + refine 16": {"granularity": "tensor", "refine": 16},
    "tensor beam 4": {"granularity": "tensor", "beam_width": 4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--targets", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--method", action="append", default=[], metavar="NAME=k:v,...")
    ap.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--also", action="append", default=[], type=Path,
                    help="another run's --json whose rows join the table and the plot (runs split over processes)")
    a = ap.parse_args()

    import torch

    from kvtool.data.passkey import build_cases, even_depths
    from kvtool.data.texts import heldout_chunks
    from kvtool.evaluation.passkey import passkey_accuracy
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.loading import load
    from kvtool.metrics import perplexity

    if a.threads:
        torch.set_num_threads(a.threads)
    methods = pick_methods(METHODS, a.method, a.only)
    targets = [float(t) for t in a.targets.split(",") if t]
    st = CalibrationStats.load(a.calib)
    model, tok = load(st.meta.get("model"))
    held = heldout_chunks(tok).input_ids
    cases = build_cases(tok, (1024,), even_depths(5))
    report = json.loads(a.json.read_text()) if a.json.exists() else {"rows": []}
    done = {(r["method"], r["target"]) for r in report["rows"]}

    def save() -> None:
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, a.json)

    if "base" not in report:
        with torch.no_grad():
            report["base"] = {"ppl": perplexity(model, held)[0], "passkey_1024": passkey_accuracy(model, tok, cases)}
        report["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        save()
    base_ppl = report["base"]["ppl"]
    for name, kw in methods.items():
        for t in targets:
            if (name, t) in done:
                continue
            r, secs = timed_search(st, model, target=t, **kw)
            plan, sc = r.plan, score_plan(model, tok, r.plan, held, stats=st, cases=cases)
            ppl, kv, kl, pk = sc["ppl"], sc["kv_held"], sc["calib_kl"], sc["passkey"]
            row = {"method": name, "settings": kw, "target": t, "kv_removed": sc["kv_removed"],
                   "kv_held": kv, "ppl": ppl, "ppl_ratio": ppl / base_ppl, "calib_kl": kl,
                   "calib_cosine": sc["calib_cosine"], "passkey_1024": pk, "search_s": round(secs, 1),
                   "map": plan.describe(), "k_source_layers": plan.k_sources, "v_source_layers": plan.v_sources}
            report["rows"].append(row)
            save()
            print(f"{name:26s} {t:.0%}: removed {row['kv_removed']:.3f} (held {kv:.3f}), ppl {ppl:.2f} "
                  f"({ppl / base_ppl:.2f}x), KL {kl:.3f}, passkey {pk:.2f}, {secs:.0f} s  {plan.describe()}",
                  flush=True)
    rows = list(report["rows"])
    for extra in a.also:
        rows += [r for r in json.loads(extra.read_text())["rows"] if (r["method"], r["target"]) not in
                 {(x["method"], x["target"]) for x in rows}]
    report = {**report, "rows": rows}
    if a.plot:
        from kvtool.plots import frontier

        pts = [{"series": r["method"], "label": r["method"], "kv_ratio": 1 - r["kv_removed"], "ppl": r["ppl"]}
               for r in rows]
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        a.plot.write_bytes(frontier(pts, base_ppl=base_ppl))
    print(table(report))


def table(report: dict) -> str:
    out = ["| method | KV bytes removed | held-out ppl (× base) | calib KL | passkey@1024 | search s |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(report["rows"], key=lambda r: (r["target"], r["method"])):
        out.append(f"| {r['method']} | {r['kv_removed']:.1%} | {r['ppl']:.2f} ({r['ppl_ratio']:.2f}×) | "
                   f"{r['calib_kl']:.3f} | {r['passkey_1024']:.2f} | {r['search_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
