"""kvtool's prompt-KV compression methods beside NVIDIA kvpress's presses, on identical inputs and the same weights.

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own environment (``.venv-kvpress/`` in the repository root
unless ``--kvpress-venv`` names another; created here when missing: torch 2.13.0 first, then kvpress 0.5.5 with
torch held by a constraint). This script (run with kvtool's environment) writes the token ids to a temporary
``in.json``, runs ``bench/kvpress_runner.py`` in that environment, runs kvtool's methods in-process with the harness
of ``kvtool eval --tasks merge`` (``prefill_kv_bytes``, ``passkey_accuracy``, ``long_context_nll``), and prints one
table: method, library, KV bytes after prefill, passkey@2048, long-context perplexity.

    python bench/vs_kvpress.py [--budgets 0.5,0.35] [--inputs eval|tune] [--methods ...] [--presses ...]
                               [--variant NAME=JSON ...] [--kvpress-venv DIR] [--no-kvpress] [--json out.json]

Inputs (``--inputs eval``, the merge task's): 10 passkey prompts of 2048 tokens (``build_cases(tok, (2048,),
MERGE_PASSKEY_DEPTHS, seed=7)``) and 4 held-out pydoc windows (``heldout_chunks(tok, 4, 2048)``), 512 tokens read
after a 1536-token context compressed at prefill. ``--inputs tune``: disjoint tuning inputs for choosing a method's
settings: 6 passkey prompts of another seed and other depths, 4 windows of pydoc's calibration split.

Budgets mean the same total: the share of the prompt KV kept after prefill. kvpress keeps it in every layer; kvtool
keeps layers 0, 1 and L-1 whole and squeezes the others so the total meets it (``protected_layers`` in a variant
changes that). The KV bytes column shows the totals are equal to within the rounding of each layer's count.
``--variant NAME=JSON`` adds kvtool rows with other ``CompressionSettings`` fields (e.g. ``'h2o_all={"method":
"h2o", "protected_layers": []}'``), at every budget.
"""

from __future__ import annotations

import argparse
import contextlib
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
PRESSES = ("streaming", "observed_attention", "snapkv", "tova", "expected_attention", "knorm", "keydiff",
           "merging_tova")
PRESS_NAMES = {"none": "none", "streaming": "StreamingLLM", "observed_attention": "ObservedAttention (≈H2O)",
               "snapkv": "SnapKV", "tova": "TOVA", "expected_attention": "ExpectedAttention", "knorm": "Knorm",
               "keydiff": "KeyDiff", "merging_tova": "Merging(TOVA)"}
METHOD_NAMES = {"none": "none", "kvmerger": "KVMerger", "h2o": "H2O", "streaming": "StreamingLLM"}
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

    if which == "eval":  # exactly kvtool.evaluation.merge_task.compare_compression's
        cases = build_cases(tok, (PASSKEY_LENGTH,), MERGE_PASSKEY_DEPTHS, seed=7)
        long_ids = heldout_chunks(tok, PPL_SAMPLES, PPL_CONTEXT + PPL_NEW).input_ids
    elif which == "tune":  # other keys, fillers and depths; windows from pydoc's calibration split (disjoint)
        cases = build_cases(tok, (PASSKEY_LENGTH,), TUNE_DEPTHS, seed=TUNE_SEED)
        long_ids = heldout_chunks(tok, PPL_SAMPLES, PPL_CONTEXT + PPL_NEW, "pydoc:calib").input_ids
    else:
        raise SystemExit(f"--inputs must be eval or tune, not {which!r}")
    return cases, long_ids


def kvtool_rows(model, tok, cases, long_ids, runs: list[tuple[str, dict[str, Any] | None]], log=print
                ) -> list[dict[str, Any]]:
    """One row per (name, CompressionSettings fields or None for no compression), in merge_task's harness."""
    import torch

    from kvtool.crosslayer.kv_check import prefill_kv_bytes
    from kvtool.evaluation.merge_task import long_context_nll
    from kvtool.evaluation.passkey import passkey_accuracy
    from kvtool.formats.merge_settings import CompressionSettings
    from kvtool.merging.compressor import compression

    probe = cases[len(cases) // 2].input_ids
    rows = []
    for name, fields in runs:
        t0 = time.perf_counter()
        settings = None if fields is None else CompressionSettings(**fields)
        with compression(model, settings) if settings is not None else contextlib.nullcontext():
            kv = prefill_kv_bytes(model, probe)
            acc = passkey_accuracy(model, tok, cases)
            nll, n = 0.0, 0
            for i in range(long_ids.shape[0]):
                a, b = long_context_nll(model, long_ids[i : i + 1], PPL_CONTEXT)
                nll, n = nll + a, n + b
        row = {"library": "kvtool", "method": name, "budget": None if fields is None else fields.get("budget"),
               "settings": fields, "kv_bytes_prefill": kv, "passkey": acc,
               "ppl": float(torch.tensor(nll / n).exp()), "seconds": round(time.perf_counter() - t0, 1)}
        log(f"kvtool  {name:18s} budget {row['budget']!s:>4}: KV {kv} B, passkey {acc:.2f}, "
            f"long-context ppl {row['ppl']:.3f} ({row['seconds']} s)")
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], none_bytes: int) -> str:
    out = ["| method | library | budget | KV bytes after prefill | / none | passkey@2048 | long-context ppl |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        names = METHOD_NAMES if r["library"] == "kvtool" else PRESS_NAMES
        b = "–" if r["budget"] is None else f"{r['budget']:g}"
        out.append(f"| {names.get(r['method'], r['method'])} | {r['library']} | {b} | {r['kv_bytes_prefill']:,} | "
                   f"{r['kv_bytes_prefill'] / none_bytes:.3f} | {r['passkey']:.2f} | {r['ppl']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.5,0.35", help="kept shares of the prompt KV (comma-separated)")
    ap.add_argument("--inputs", default="eval", choices=("eval", "tune"))
    ap.add_argument("--methods", default=None, help="kvtool methods (default: all of kvtool's METHODS)")
    ap.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses (bench/kvpress_runner.py names)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="an extra kvtool row per budget with these CompressionSettings fields")
    ap.add_argument("--kvpress-venv", type=Path, default=ROOT / ".venv-kvpress")
    ap.add_argument("--no-kvpress", action="store_true", help="kvtool's rows only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the checks here")
    a = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    import kvtool
    from kvtool.formats.merge_settings import METHODS
    from kvtool.io.loading import resolve_model

    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",") if b]
    methods = [m for m in (a.methods.split(",") if a.methods else METHODS) if m]
    variants = []
    for v in a.variant:
        name, _, js = v.partition("=")
        variants.append((name, json.loads(js)))
    model_dir = resolve_model(None)[0]
    model, tok = kvtool.load(None)
    cases, long_ids = build_inputs(tok, a.inputs)
    log(f"inputs {a.inputs}: {len(cases)} passkey prompts of <= {PASSKEY_LENGTH} tokens, {long_ids.shape[0]} windows "
        f"({PPL_NEW} tokens after {PPL_CONTEXT}); model {model_dir}")

    kvpress_out = None
    if not a.no_kvpress:
        py = ensure_kvpress_venv(a.kvpress_venv, log)
        with tempfile.TemporaryDirectory() as d:
            inp = {"budgets": budgets, "presses": [p for p in a.presses.split(",") if p], "max_new_tokens": 8,
                   "passkey": [{"input_ids": c.input_ids[0].tolist(), "key": c.key} for c in cases],
                   "long_context": [{"input_ids": row.tolist(), "context": PPL_CONTEXT} for row in long_ids]}
            (Path(d) / "in.json").write_text(json.dumps(inp))
            subprocess.run([str(py), str(RUNNER), "--model", model_dir, "--inputs", str(Path(d) / "in.json"),
                            "--out", str(Path(d) / "out.json"), "--threads", str(a.threads)], check=True)
            kvpress_out = json.loads((Path(d) / "out.json").read_text())

    runs: list[tuple[str, dict[str, Any] | None]] = [("none", None)]
    runs += [(m, {"method": m, "budget": b}) for b in budgets for m in methods]
    runs += [(name, {**fields, "budget": b}) for b in budgets for name, fields in variants]
    rows = kvtool_rows(model, tok, cases, long_ids, runs, log)
    checks: dict[str, Any] = {}
    if kvpress_out is not None:
        for r in kvpress_out["rows"]:
            if "error" not in r:
                rows.append({"library": "kvpress", "method": r["press"], "budget": r["budget"],
                             "settings": r["kvpress_kwargs"], "kv_bytes_prefill": r["kv_bytes_prefill"],
                             "passkey": r["passkey"], "ppl": r["ppl"], "seconds": r["seconds"]})
        mine = rows[0]
        theirs = next(r for r in rows if r["library"] == "kvpress" and r["method"] == "none")
        checks = {"ppl_rel_diff": abs(mine["ppl"] - theirs["ppl"]) / theirs["ppl"],
                  "passkey_same": mine["passkey"] == theirs["passkey"],
                  "kv_bytes_same": mine["kv_bytes_prefill"] == theirs["kv_bytes_prefill"],
                  "kvpress_no_cache_ppl": (kvpress_out.get("reference") or {}).get("ppl_no_cache"),
                  "kvpress_errors": [r for r in kvpress_out["rows"] if "error" in r],
                  "kvpress_skipped": kvpress_out["presses_skipped"]}
        checks["agree"] = checks["ppl_rel_diff"] < 1e-3 and checks["passkey_same"] and checks["kv_bytes_same"]
    order = {b: i for i, b in enumerate([None, *budgets])}
    rows.sort(key=lambda r: (order.get(r["budget"], len(order)), r["library"] != "kvtool"))
    none_bytes = rows[0]["kv_bytes_prefill"]
    print(table(rows, none_bytes))
    if checks:
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
