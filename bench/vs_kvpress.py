"""kvtool's prompt-KV merge methods beside NVIDIA kvpress's presses, on identical inputs and the same weights.

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own environment (``.venv-kvpress/`` in the repository root
unless ``--kvpress-venv`` names another; created here when missing: torch 2.13.0 first, then kvpress 0.5.5 with
torch held by a constraint). This script (run with kvtool's environment) writes the token ids to ``in.json``, runs
``bench/kvpress_runner.py`` in that environment (in a second process, beside kvtool's rows, unless ``--serial``),
runs kvtool's methods in-process with the harness of ``kvtool eval --tasks merge`` (``prefill_kv_bytes``,
``passkey_accuracy``, ``long_context_nll``), and prints one table: method, library, KV bytes after prefill,
passkey@2048, long-context perplexity; then the checks (the two "none" rows agree; kvtool's StreamingLLM and H2O
next to kvpress's StreamingLLM and ObservedAttention).

    python bench/vs_kvpress.py [--budgets 0.5,0.35] [--inputs eval|tune] [--methods ...] [--presses ...]
                               [--variant NAME=JSON ...] [--stats CALIB [--calibrated kvmerger,...]]
                               [--kvpress-venv DIR] [--no-kvpress] [--threads 1]
                               [--kvpress-cache DIR [--partial]] [--json out.json]

Inputs (``--inputs eval``, the merge task's): 10 passkey prompts of 2048 tokens (``build_cases(tok, (2048,),
MERGE_PASSKEY_DEPTHS, seed=7)``) and 4 held-out pydoc windows (``heldout_chunks(tok, 4, 2048)``), 512 tokens read
after a 1536-token context compressed at prefill. ``--inputs tune``: disjoint tuning inputs for choosing a method's
settings: 6 passkey prompts of another seed and other depths, 4 windows of pydoc's calibration split.

Budgets mean the same total: the share of the prompt KV kept after prefill. kvpress keeps it in every layer; kvtool's
KVMerger, H2O and StreamingLLM keep layers 0, 1 and L-1 whole and squeeze the others so the total meets it, and
attnmerge compresses every layer alike. The fair rows (``FAIR``, on unless ``--no-fair``) run kvtool's H2O and
StreamingLLM with ``protected_layers: []`` too. The KV bytes column shows the totals are equal to within the
rounding of each layer's count. ``--variant NAME=JSON`` adds kvtool rows with other settings of a method
(e.g. ``'am_w32={"method": "attnmerge", "window": 32}'``), at every budget. ``--stats CALIB`` (a ``kvtool calibrate``
directory of the same model) adds a row per ``--calibrated`` method and budget with the per-layer budgets
``search --merge-budget`` calibrates from the keys' similarity (``NAME_cal``), beside the even split.

A full run is about 30 rows of ~2 minutes each on one core; ``--kvpress-cache DIR`` keeps both halves' results
(kvpress's ``out.json``, written after every row, and kvtool's rows keyed by their resolved settings) so a rerun on
the same inputs measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "bench" / "kvpress_runner.py"
TORCH_PIN = "torch==2.13.0"
KVPRESS_PIN = "kvpress==0.5.5"
PRESSES = ("streaming", "snapkv", "tova", "expected_attention", "observed_attention", "knorm", "keydiff",
           "merging_tova")
PRESS_NAMES = {"none": "none", "streaming": "StreamingLLM", "observed_attention": "ObservedAttention (≈H2O)",
               "snapkv": "SnapKV", "tova": "TOVA", "expected_attention": "ExpectedAttention", "knorm": "Knorm",
               "keydiff": "KeyDiff", "merging_tova": "Merging(TOVA)"}
METHOD_NAMES = {"none": "none", "kvmerger": "KVMerger", "h2o": "H2O", "streaming": "StreamingLLM",
                "attnmerge": "attnmerge", "h2o_all": "H2O, all layers", "streaming_all": "StreamingLLM, all layers",
                "attnmerge_evict": "attnmerge, no merging (min_similarity 1)", "kvmerger_cal": "KVMerger, calibrated",
                "h2o_cal": "H2O, calibrated", "attnmerge_cal": "attnmerge, calibrated",
                "streaming_cal": "StreamingLLM, calibrated"}
# the fair rows: kvtool's methods with every layer compressed alike, as kvpress does (kvtool protects 0, 1 and L-1)
FAIR = {"streaming_all": {"method": "streaming", "protected_layers": []},
        "h2o_all": {"method": "h2o", "protected_layers": []}}
# kvtool rows compared with the reference implementation of the same method: (kvtool row, kvpress row)
SAME_METHOD = (("streaming_all", "streaming"), ("streaming", "streaming"), ("h2o_all", "observed_attention"),
               ("h2o", "observed_attention"))
TUNE_SEED = 11
TUNE_DEPTHS = (0.1, 0.25, 0.4, 0.6, 0.75, 0.9)
PASSKEY_LENGTH, PPL_SAMPLES, PPL_CONTEXT, PPL_NEW = 2048, 4, 1536, 512


def ensure_kvpress_venv(path: Path, log=print) -> Path:
    """The kvpress environment's Python, created (torch first, then kvpress with torch held) when missing."""
    py = path / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import kvpress"], capture_output=True).returncode == 0:
        return py
    log(f"creating the kvpress environment in {path} ({TORCH_PIN}, then {KVPRESS_PIN}) ...")
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    with tempfile.TemporaryDirectory() as d:
        constraints = Path(d) / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        subprocess.run([*pip, KVPRESS_PIN, "-c", str(constraints)], check=True)
    return py


def build_inputs(tok, which: str) -> tuple[list[Any], Any]:
    """(passkey cases, long-context windows [N, 2048]) of the eval or of the tuning set."""
    from kvtool.data.passkey import MERGE_PASSKEY_DEPTHS, build_cases
    from kvtool.data.texts import heldout_chunks

    if which == "eval":  # exactly kvtool.evaluation.merge_task.compare_merging's
        cases = build_cases(tok, (PASSKEY_LENGTH,), MERGE_PASSKEY_DEPTHS, seed=7)
        long_ids = heldout_chunks(tok, PPL_SAMPLES, PPL_CONTEXT + PPL_NEW).input_ids
    elif which == "tune":  # other keys, fillers and depths; windows from pydoc's calibration split (disjoint)
        cases = build_cases(tok, (PASSKEY_LENGTH,), TUNE_DEPTHS, seed=TUNE_SEED)
        long_ids = heldout_chunks(tok, PPL_SAMPLES, PPL_CONTEXT + PPL_NEW, "pydoc:calib").input_ids
    else:
        raise SystemExit(f"--inputs must be eval or tune, not {which!r}")
    return cases, long_ids


def row_key(name: str, fields: dict[str, Any] | None) -> str:
    """A kvtool row's cache key: its name and resolved settings (the method's own fields only)."""
    from kvtool.merging.methods import method_from_dict

    return json.dumps([name, None if fields is None else method_from_dict(fields).to_dict()], sort_keys=True)


def kvtool_rows(model, tok, cases, long_ids, runs: list[tuple[str, dict[str, Any] | None]], log=print,
                cache: Path | None = None, cached_only: bool = False) -> list[dict[str, Any]]:
    """One row per (name, a method's fields with "method", or None for no merging), in merge_task's harness. With
    ``cache`` (a JSON file), rows measured before on the same inputs with the same resolved settings are reused and
    every new row is added to it; ``cached_only`` measures nothing and leaves the rest out."""
    import hashlib

    from kvtool.evaluation.merge_task import measure
    from kvtool.merging.methods import make_method

    h = hashlib.sha256()
    for t in [c.input_ids for c in cases] + [long_ids]:
        h.update(t.numpy().tobytes())
    digest = h.hexdigest()
    stored: dict[str, Any] = {}
    for path in [] if cache is None else sorted(cache.parent.glob(cache.stem + "*.json")):
        old = json.loads(path.read_text())  # the cache, and any kvtool_rows*.json of runs made beside it
        if old.get("inputs_sha256") == digest:
            stored.update({row_key(r["method"], r.get("resolved") or r["settings"]): r for r in old["rows"].values()})
    rows = []
    for name, fields in runs:
        t0 = time.perf_counter()
        settings = None if fields is None else make_method(**fields)
        key = row_key(name, None if settings is None else settings.to_dict())
        if key in stored:
            rows.append(stored[key])
            log(f"kvtool  {name:18s} budget {stored[key]['budget']!s:>4}: reused from {cache}")
            continue
        if cached_only:
            log(f"kvtool  {name:18s} budget {None if fields is None else fields.get('budget')!s:>4}: not measured")
            continue
        kv, acc, ppl = measure(model, tok, settings, cases, long_ids, PPL_CONTEXT)
        row = {"library": "kvtool", "method": name, "budget": None if fields is None else fields.get("budget"),
               "settings": fields, "resolved": None if settings is None else settings.to_dict(),
               "kv_bytes_prefill": kv, "passkey": acc, "ppl": ppl,
               "seconds": round(time.perf_counter() - t0, 1)}
        log(f"kvtool  {name:18s} budget {row['budget']!s:>4}: KV {kv} B, passkey {acc:.2f}, "
            f"long-context ppl {row['ppl']:.3f} ({row['seconds']} s)")
        rows.append(row)
        if cache is not None:
            stored[key] = row
            cache.write_text(json.dumps({"inputs_sha256": digest, "rows": stored}, indent=1))
    return rows


def table(rows: list[dict[str, Any]], none_bytes: int | None) -> str:
    """The markdown table; ``none_bytes``: the uncompressed prompt's KV bytes (None: not measured, no ratio)."""
    out = ["| method | library | budget | KV bytes after prefill | / none | passkey@2048 | long-context ppl |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        names = METHOD_NAMES if r["library"] == "kvtool" else PRESS_NAMES
        b = "–" if r["budget"] is None else f"{r['budget']:g}"
        out.append(f"| {names.get(r['method'], r['method'])} | {r['library']} | {b} | {r['kv_bytes_prefill']:,} | "
                   f"{'–' if not none_bytes else format(r['kv_bytes_prefill'] / none_bytes, '.3f')} | "
                   f"{r['passkey']:.2f} | {r['ppl']:.3f} |")
    return "\n".join(out)


def same_method(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kvtool's re-implementations next to the reference ones, per budget (``SAME_METHOD``)."""
    by = {(r["library"], r["method"], r["budget"]): r for r in rows}
    out = []
    for mine, ref in SAME_METHOD:
        for (lib, name, b), r in by.items():
            t = by.get(("kvpress", ref, b))
            if lib == "kvtool" and name == mine and t is not None:
                out.append({"kvtool": mine, "kvpress": ref, "budget": b, "kvtool_ppl": r["ppl"],
                            "kvpress_ppl": t["ppl"], "ppl_rel_diff": (r["ppl"] - t["ppl"]) / t["ppl"],
                            "kvtool_passkey": r["passkey"], "kvpress_passkey": t["passkey"],
                            "kv_bytes": [r["kv_bytes_prefill"], t["kv_bytes_prefill"]]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.5,0.35", help="kept shares of the prompt KV (comma-separated)")
    ap.add_argument("--inputs", default="eval", choices=("eval", "tune"))
    ap.add_argument("--methods", default=None, help="kvtool methods (default: all of kvtool's METHODS)")
    ap.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses (bench/kvpress_runner.py names)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="an extra kvtool row per budget with these settings of a method")
    ap.add_argument("--stats", type=Path, default=None, help="a calibration of this model: also run --calibrated "
                                                             "methods with calibrated per-layer budgets")
    ap.add_argument("--calibrated", default="kvmerger", help="methods to run with calibrated budgets (with --stats)")
    ap.add_argument("--kvpress-venv", type=Path, default=ROOT / ".venv-kvpress")
    ap.add_argument("--no-kvpress", action="store_true", help="kvtool's rows only")
    ap.add_argument("--no-kvtool", action="store_true", help="run (or cache) the kvpress rows only")
    ap.add_argument("--kvpress-cache", type=Path, default=None, metavar="DIR",
                    help="keep the runner's in.json/out.json and kvtool's rows here; a rerun on the same inputs "
                         "reuses what was measured (kvtool rows by their resolved settings) and measures the rest")
    ap.add_argument("--partial", action="store_true",
                    help="with --kvpress-cache: build the table from what the cache holds, measure nothing (the "
                         "rows of a stopped run; the missing ones are listed)")
    ap.add_argument("--no-none", action="store_true",
                    help="skip kvtool's uncompressed row (a partial run that fills --kvpress-cache)")
    ap.add_argument("--no-fair", action="store_true",
                    help="leave out the kvtool rows with every layer compressed (protected_layers: [])")
    ap.add_argument("--serial", action="store_true", help="run kvpress before kvtool instead of beside it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each of the two processes")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the checks here")
    a = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    import kvtool
    from kvtool.io.loading import resolve_model
    from kvtool.merging.methods import METHODS

    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",") if b]
    methods = [m for m in (a.methods.split(",") if a.methods else METHODS) if m]
    variants = [] if a.no_fair else list(FAIR.items())
    for v in a.variant:
        name, _, js = v.partition("=")
        variants.append((name, json.loads(js)))
    model_dir = resolve_model(None)[0]
    model, tok = kvtool.load(None)
    cases, long_ids = build_inputs(tok, a.inputs)
    log(f"inputs {a.inputs}: {len(cases)} passkey prompts of <= {PASSKEY_LENGTH} tokens, {long_ids.shape[0]} windows "
        f"({PPL_NEW} tokens after {PPL_CONTEXT}); model {model_dir}")

    runs: list[tuple[str, dict[str, Any] | None]] = [] if a.no_none else [("none", None)]
    runs += [(m, {"method": m, "budget": b}) for b in budgets for m in methods]
    runs += [(name, {**fields, "budget": b}) for b in budgets for name, fields in variants]
    if a.stats is not None:
        from kvtool.calibration.merge_budgets import merge_settings
        from kvtool.formats.plan import SharingPlan
        from kvtool.formats.stats import CalibrationStats

        stats = CalibrationStats.load(a.stats)
        plan = SharingPlan.identity(model.config.num_hidden_layers)
        runs += [(f"{m}_cal", merge_settings(stats, b, plan, m)) for b in budgets
                 for m in a.calibrated.split(",") if m]
    kvpress_out = None
    with tempfile.TemporaryDirectory() as tmp:
        d = a.kvpress_cache or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        proc = None
        if not a.no_kvpress:
            inp = json.dumps({"budgets": budgets, "presses": [p for p in a.presses.split(",") if p],
                              "max_new_tokens": 8,
                              "passkey": [{"input_ids": c.input_ids[0].tolist(), "key": c.key} for c in cases],
                              "long_context": [{"input_ids": row.tolist(), "context": PPL_CONTEXT}
                                               for row in long_ids]})
            same = (d / "out.json").is_file() and (d / "in.json").is_file() and (d / "in.json").read_text() == inp
            done = same and (a.partial or json.loads((d / "out.json").read_text()).get("complete", False))
            if done:
                log(f"kvpress rows: reusing {d / 'out.json'} (made by bench/kvpress_runner.py on these inputs)")
            else:
                if not same:
                    (d / "out.json").unlink(missing_ok=True)
                    (d / "in.json").write_text(inp)
                py = ensure_kvpress_venv(a.kvpress_venv, log)
                cmd = [str(py), str(RUNNER), "--model", model_dir, "--inputs", str(d / "in.json"),
                       "--out", str(d / "out.json"), "--threads", str(a.threads), "--resume"]
                if a.serial or a.no_kvtool:
                    subprocess.run(cmd, check=True)
                else:  # kvpress's rows in its own process while kvtool's run here (one core each, --threads 1)
                    proc = subprocess.Popen(cmd)
        rows = [] if a.no_kvtool else kvtool_rows(model, tok, cases, long_ids, runs, log,
                                                  None if a.kvpress_cache is None else d / "kvtool_rows.json",
                                                  cached_only=a.partial)
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"bench/kvpress_runner.py failed with exit status {proc.returncode}")
        if not a.no_kvpress:
            kvpress_out = json.loads((d / "out.json").read_text())
    if a.no_kvtool:
        return 0
    checks: dict[str, Any] = {}
    if kvpress_out is not None:
        for r in kvpress_out["rows"]:
            if "error" not in r:
                rows.append({"library": "kvpress", "method": r["press"], "budget": r["budget"],
                             "settings": r["kvpress_kwargs"], "kv_bytes_prefill": r["kv_bytes_prefill"],
                             "passkey": r["passkey"], "ppl": r["ppl"], "seconds": r["seconds"]})
        mine = next((r for r in rows if r["library"] == "kvtool" and r["method"] == "none"), None)
        theirs = next(r for r in rows if r["library"] == "kvpress" and r["method"] == "none")
        cmp = mine is not None  # no kvtool "none" row (--no-none): the two are not compared
        checks = {"ppl_rel_diff": abs(mine["ppl"] - theirs["ppl"]) / theirs["ppl"] if cmp else None,
                  "passkey_same": mine["passkey"] == theirs["passkey"] if cmp else None,
                  "kv_bytes_same": mine["kv_bytes_prefill"] == theirs["kv_bytes_prefill"] if cmp else None,
                  "kvpress_no_cache_ppl": (kvpress_out.get("reference") or {}).get("ppl_no_cache"),
                  "kvpress_errors": [r for r in kvpress_out["rows"] if "error" in r],
                  "kvpress_skipped": kvpress_out["presses_skipped"],
                  "kvpress_complete": kvpress_out.get("complete", True),
                  "kvpress_not_measured": [f"{p}@{b:g}" for p in a.presses.split(",") if p for b in budgets
                                           if not any(r["press"] == p and r["budget"] == b and "error" not in r
                                                      for r in kvpress_out["rows"])]}
        checks["agree"] = (checks["ppl_rel_diff"] < 1e-3 and checks["passkey_same"] and checks["kv_bytes_same"]
                           if cmp else None)
        checks["same_method"] = same_method(rows)
    have = {(r["method"], r["budget"]) for r in rows if r["library"] == "kvtool"}
    checks["kvtool_not_measured"] = [f"{n}@{(f or {}).get('budget', '-')}" for n, f in runs
                                     if (n, None if f is None else f.get("budget")) not in have]
    order = {b: i for i, b in enumerate([None, *budgets])}
    rows.sort(key=lambda r: (order.get(r["budget"], len(order)), r["library"] != "kvtool"))
    none_bytes = next((r["kv_bytes_prefill"] for r in rows if r["method"] == "none"), None)
    print(table(rows, none_bytes))
    for c in checks.get("same_method", []):
        print(f"kvtool {c['kvtool']} vs kvpress {c['kvpress']} at {c['budget']:g}: ppl {c['kvtool_ppl']:.3f} vs "
              f"{c['kvpress_ppl']:.3f} ({c['ppl_rel_diff']:+.1%}), passkey {c['kvtool_passkey']:.2f} vs "
              f"{c['kvpress_passkey']:.2f}")
    missing = checks.get("kvtool_not_measured", []) + checks.get("kvpress_not_measured", [])
    if missing:
        print(f"not measured (run stopped): {', '.join(missing)}")
    if checks.get("ppl_rel_diff") is not None:
        print(f"\n'none' rows agree: {checks['agree']} (ppl relative difference {checks['ppl_rel_diff']:.1e}, "
              f"same passkey {checks['passkey_same']}, same KV bytes {checks['kv_bytes_same']})")
    if a.json:
        a.json.write_text(json.dumps({"inputs": a.inputs, "budgets": budgets, "model": model_dir,
                                      "threads": a.threads, "checks": checks, "rows": rows,
                                      "kvpress": None if kvpress_out is None else
                                      {k: v for k, v in kvpress_out.items() if k != "rows"},
                                      "kvpress_rows": None if kvpress_out is None else kvpress_out["rows"]},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
