"""Does the search generalise? Map quality on held-out text against the calibration it was searched on.

For each calibration directory (``kvtool calibrate`` output: sizes, mixes) and each search method, at each target:
``kvtool.search`` (timed), then the map's held-out perplexity (pydoc held-out split: 8 × 256 tokens, the number the
README quotes, and 64 × 256 tokens, less noisy), its held-out KL vs the base (next-token, on the 64 × 256 chunks), its
KL on its own calibration (``search.compare.calibration_metrics``; not comparable across calibrations) and the KV
bytes removed. Rows are appended to ``--json`` as they finish, so an interrupted run resumes where it stopped.

The plain path (best-first, whole layers, beam width 1, no refinement) takes every step the same way whatever the
target (on a model whose layers all hold the same bytes), so it runs once to the largest target and the smaller
targets' maps and times are read off its accepted moves (``--separate`` runs each target on its own instead; the
prefix maps were checked equal to separate searches on the default calibration).

    python bench/calibration_size.py --calib NAME=DIR [--calib NAME=DIR ...] --json OUT.json [--md OUT.md]
        [--targets 0.1,0.2,0.3] [--method NAME=k:v,...] [--only NAME,...] [--threads 1] [--separate]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from common import pick_methods, removed_share, timed_search

METHODS = {"path": {}}  # more with --method, e.g. "refine 16=refine:16" or "refine 16 + holdout=refine:16,..."


def _is_plain_path(kw: dict) -> bool:
    return all(kw.get(k, d) == d for k, d in (("order", "best-first"), ("granularity", "layer"), ("beam_width", 1),
                                              ("refine", 0), ("layers", None), ("threshold", None)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--targets", default="0.1,0.2,0.3")
    ap.add_argument("--method", action="append", default=[], metavar="NAME=k:v,...")
    ap.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--separate", action="store_true", help="search each target on its own, also for the path")
    a = ap.parse_args()

    import torch

    from kvtool.crosslayer.runtime import sharing
    from kvtool.data.texts import heldout_chunks
    from kvtool.formats.cache_size import tensor_units, units_to_remove
    from kvtool.formats.plan import SharingPlan
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.loading import load
    from kvtool.metrics import kl_per_sample, logits_from_hidden, nll_sum
    from kvtool.search.moves import Goal, Move, apply_move, identity

    if a.threads:
        torch.set_num_threads(a.threads)
    methods = pick_methods(METHODS, a.method, a.only)
    targets = sorted(float(t) for t in a.targets.split(",") if t)
    calibs = dict(c.split("=", 1) for c in a.calib)
    report = json.loads(a.json.read_text()) if a.json.exists() else {"rows": []}
    done = {(r["calib"], r["method"], r["target"]) for r in report["rows"]}
    model = held = None
    in8: list[int] = []  # the 8 chunks the README's held-out perplexity reads are among the 64
    base_logp: list[torch.Tensor] = []

    def save() -> None:
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, a.json)

    @torch.no_grad()
    def heldout(plan: SharingPlan) -> tuple[list[float], torch.Tensor]:
        """Per held-out chunk: summed NLL (its tokens' perplexity) and KL vs the base at the KL positions."""
        nll, kl, first = [], [], not base_logp
        with sharing(model, plan):
            for s in range(0, held.shape[0], 4):
                ids = held[s : s + 4]
                logits = logits_from_hidden(model, model.model(input_ids=ids, use_cache=False).last_hidden_state)
                nll += [nll_sum(logits[r, :-1], ids[r, 1:])[0] for r in range(ids.shape[0])]
                if first:  # the base model itself: its log-probabilities are the reference
                    base_logp.append(torch.log_softmax(logits[:, pos], -1))
                kl.append(kl_per_sample(base_logp[s // 4], logits[:, pos]))
        return nll, torch.cat(kl)

    def ppl(nll: list[float], rows: list[int]) -> float:
        return math.exp(sum(nll[r] for r in rows) / (len(rows) * (held.shape[1] - 1)))

    def measure(plan: SharingPlan) -> dict:
        nll, kl = heldout(plan)
        b = report["base"]
        p8, p64 = ppl(nll, in8), ppl(nll, list(range(held.shape[0])))
        return {"ppl": p8, "ppl_ratio": p8 / b["ppl"], "ppl64": p64, "ppl64_ratio": p64 / b["ppl64"],
                "heldout_kl": float(kl.mean()), "map": plan.describe(), "k_source_layers": plan.k_sources,
                "v_source_layers": plan.v_sources}

    for cname, cdir in calibs.items():
        st = CalibrationStats.load(cdir)
        if model is None:
            model, tok = load(st.meta.get("model"))
            held = heldout_chunks(tok, samples=64).input_ids
            rows = [tuple(r) for r in held.tolist()]
            in8 = sorted(rows.index(tuple(r)) for r in heldout_chunks(tok).input_ids.tolist())
            pos = torch.linspace(0, held.shape[1] - 1, 32).round().long().unique()
            nll, _ = heldout(SharingPlan.identity(st.num_layers))  # also stores the base's log-probabilities
            if "base" not in report:
                report["base"] = {"ppl": ppl(nll, in8), "ppl64": ppl(nll, list(range(held.shape[0])))}
                report["machine"] = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                                     f"{torch.get_num_threads()} threads")
                save()
        cal = {k: st.meta[k] for k in ("data", "samples", "seq_len")}
        types, sliding = list(st.meta["layer_types"]), getattr(model.config, "sliding_window", None)
        for mname, kw in methods.items():
            todo = [t for t in targets if (cname, mname, t) not in done]
            if not todo:
                continue
            if _is_plain_path(kw) and not a.separate:
                stamps: list[tuple[float, dict]] = []
                t0 = time.perf_counter()
                r, total = timed_search(st, model, target=max(todo), **kw,
                                        on_try=lambda rec, out=stamps: out.append((time.perf_counter(), rec)))
                units = tensor_units(types, sliding, r.plan.details["context"])
                accepted = [(ts, Move(rec["j"], rec["tensors"], rec["i"]), rec["score"]) for ts, rec in stamps
                            if rec["accepted"]]
                runs = []
                for t in todo:
                    goal, src = Goal(tuple(units), units_to_remove(units, t)), identity(len(units))
                    secs = kl = 0.0  # kl: the accepted map's calibration KL as the search scored it
                    for ts, m, score in accepted:
                        if goal.reached(src):
                            break
                        src, secs, kl = apply_move(src, m), ts - t0, score
                    plan = SharingPlan.from_tensors(list(src[0]), list(src[1]), layer_types=types)
                    plan.details["context"] = r.plan.details["context"]
                    runs.append((t, plan, secs if t < max(todo) else total, kl))
            else:
                runs = []
                for t in todo:
                    r, secs = timed_search(st, model, target=t, **kw)
                    runs.append((t, r.plan, secs, r.plan.score))
            for t, plan, secs, kl in runs:
                row = {"calib": cname, "calibration": cal, "method": mname, "settings": kw, "target": t,
                       "kv_removed": removed_share(plan, sliding), "search_s": round(secs, 1), "calib_kl": kl,
                       **measure(plan)}
                report["rows"].append(row)
                save()
                print(f"{cname:14s} {mname:22s} {t:.0%}: ppl {row['ppl']:.2f} ({row['ppl_ratio']:.2f}x), ppl64 "
                      f"{row['ppl64_ratio']:.3f}x, held-out KL {row['heldout_kl']:.3f}, calib KL "
                      f"{row['calib_kl']:.3f}, {secs:.0f} s  {row['map']}", flush=True)
    md = table(report)
    print(md)
    if a.md:
        a.md.write_text(md + "\n")


def table(report: dict) -> str:
    b = report["base"]
    out = [f"Base: held-out ppl {b['ppl']:.2f} (8 × 256 tokens), {b['ppl64']:.2f} (64 × 256 tokens).", "",
           "| target | calibration | method | held-out ppl 8×256 (× base) | 64×256 (× base) | held-out KL | "
           "calib KL | search s | map |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(report["rows"], key=lambda r: r["target"]):
        out.append(f"| {r['target']:.0%} | {r['calib']} | {r['method']} | {r['ppl']:.2f} ({r['ppl_ratio']:.2f}×) | "
                   f"{r['ppl64']:.2f} ({r['ppl64_ratio']:.3f}×) | {r['heldout_kl']:.3f} | {r['calib_kl']:.3f} | "
                   f"{r['search_s']:.0f} | {r['map']} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
