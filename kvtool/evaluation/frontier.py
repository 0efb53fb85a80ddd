"""``kvtool eval --plans``: perplexity and measured KV bytes of several plans on one base model, and the
quality-vs-memory frontier plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtool.atomic import check_writable_file, write_bytes_atomic, write_json_atomic
from kvtool.crosslayer.kv_check import prefill_kv_bytes
from kvtool.crosslayer.runtime import sharing
from kvtool.data.texts import heldout_chunks
from kvtool.evaluation.quality import Perplexity
from kvtool.formats.plan import SharingPlan
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import load, model_origin
from kvtool.metrics import perplexity
from kvtool.plots import frontier as draw_frontier
from kvtool.progress import Log


@torch.no_grad()
def frontier(plans: list[str | Path], *, model: str | None = None, data: str | None = None,
             settings: Perplexity | None = None, plots: str | Path | None = None, json_out: str | Path | None = None,
             force: bool = False, dtype: str | None = None, device: str | None = None,
             log: Log | None = None) -> dict[str, Any]:
    """Perplexity (held-out text as ``settings`` gives it) and measured KV bytes of several plans on one base model;
    draws the quality-vs-memory frontier."""
    s = settings or Perplexity()
    if json_out is not None:
        check_writable_file(json_out, force)
    loaded = [(str(p), SharingPlan.load(p)) for p in plans]
    base, tok = load(model if model is not None else loaded[0][1].model_source, dtype=dtype, device=device)
    for _name, plan in loaded:
        check_fingerprint(plan.model_fingerprint, model_fingerprint(base), f"plan {_name}",
                          "pass the --model it was searched on")
    ids = heldout_chunks(tok, s.samples, s.seq_len, data).input_ids
    probe_ids = ids[:1]

    def measure(plan: SharingPlan) -> tuple[float, int]:
        with sharing(base, plan):
            ppl, _ = perplexity(base, ids)
            return ppl, prefill_kv_bytes(base, probe_ids)

    base_ppl, base_kv = measure(SharingPlan.identity(base.config.num_hidden_layers))
    rows = []
    for name, plan in loaded:
        ppl, kv = measure(plan)
        rows.append({"plan": name, "label": Path(name).stem, "consumers": len(plan.consumers), "ppl": ppl,
                     "ppl_ratio": ppl / base_ppl, "kv_ratio": kv / base_kv})
        if log:
            log(f"{name}: ppl {ppl:.2f} ({ppl / base_ppl:.2f}x base), KV {kv / base_kv:.3f} of base")
    report = {"model": model_origin(base).name, "base_ppl": base_ppl, "rows": rows}
    if plots is not None:
        Path(plots).mkdir(parents=True, exist_ok=True)
        target = check_writable_file(Path(plots) / "frontier.png", force)
        write_bytes_atomic(target, draw_frontier(rows, base_ppl=base_ppl))
        report["plots"] = {"frontier": str(target)}
    if json_out is not None:
        write_json_atomic(json_out, report)
    return report


def frontier_table(report: dict[str, Any]) -> Any:
    """One row per plan: perplexity and KV bytes against the base."""
    from rich.table import Table

    t = Table(title=f"{report['model']}: perplexity vs KV bytes (base perplexity {report['base_ppl']:.2f})",
              title_justify="left")
    for c in ("plan", "consumers", "perplexity", "ppl / base", "KV / base"):
        t.add_column(c, justify="left" if c == "plan" else "right")
    for r in report["rows"]:
        t.add_row(r["plan"], str(r["consumers"]), f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}", f"{r['kv_ratio']:.4f}")
    return t
