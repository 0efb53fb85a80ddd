"""``kvtool search --compare``: every order and layout at one target, scored the same way, side by side."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvtool.atomic import check_writable_file, write_json_atomic
from kvtool.crosslayer.runtime import sharing
from kvtool.data.texts import heldout_chunks
from kvtool.formats.plan import SharingPlan
from kvtool.formats.stats import CalibrationStats
from kvtool.io.loading import model_and_tokenizer
from kvtool.metrics import cosine_score, kl_per_sample, logits_from_hidden, perplexity
from kvtool.progress import Log
from kvtool.search.layouts import LAYOUTS
from kvtool.search.search import search
from kvtool.search.strategies import ORDERS


@dataclass
class CompareRow:
    name: str
    consumers: int
    calib_cosine: float
    calib_kl: float
    heldout_ppl: float
    search_s: float
    kv_source_layers: list[int]


@torch.no_grad()
def calibration_metrics(model, stats: CalibrationStats, plan: SharingPlan, batch_size: int = 16,
                        kl_positions: int = 32) -> tuple[float, float]:
    """(mean per-sample cosine of final hidden states, mean next-token KL) of ``plan`` vs the stored base."""
    ids, base = stats.input_ids, stats.final_hidden
    pos = torch.linspace(0, ids.shape[1] - 1, min(ids.shape[1], kl_positions)).round().long().unique()
    dev = next(model.parameters()).device
    cos, kl = [], []
    with sharing(model, plan):
        for s in range(0, ids.shape[0], batch_size):
            h = model.model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False).last_hidden_state
            b = base[s : s + batch_size]
            cos.append(cosine_score(h.cpu(), b))
            logp = torch.log_softmax(logits_from_hidden(model, b[:, pos].to(dev, h.dtype)), -1).cpu()
            kl.append(kl_per_sample(logp, logits_from_hidden(model, h[:, pos]).cpu()))
    return float(torch.cat(cos).mean()), float(torch.cat(kl).mean())


def compare(stats: CalibrationStats, model, tokenizer, target: float | None, *,
            orders=tuple(ORDERS), layouts=tuple(LAYOUTS), extra: dict[str, dict] | None = None, seed: int = 0,
            threshold: float | None = None, heldout: torch.Tensor | None = None, layers: int | None = None,
            log=None) -> list[CompareRow]:
    """Search with each order (and ``extra`` search kwargs by name), build each layout, then score all alike
    (at ``target`` of the KV bytes, or ``layers`` whole consumer layers)."""
    if heldout is None:
        heldout = heldout_chunks(tokenizer).input_ids
    plans: list[tuple[str, SharingPlan, float]] = []
    L = stats.num_layers
    plans.append(("none (base)", SharingPlan.identity(L), 0.0))
    runs = {f"order={o}": {"order": o} for o in orders}
    runs.update({f"layout={lay}": {"layout": lay} for lay in layouts})
    runs.update(extra or {})
    for name, kw in runs.items():
        t = time.time()
        r = search(stats, model=model, target=target, layers=layers, seed=seed, threshold=threshold,
                   allow_partial=True, **kw)
        plans.append((name, r.plan, time.time() - t))
        if log:
            note = " (partial: the guard stopped it)" if r.partial else ""
            log(f"{name}: {r.plan.describe()} ({time.time() - t:.1f} s){note}")
    rows = []
    for name, plan, secs in plans:
        cos, kl = calibration_metrics(model, stats, plan)
        with sharing(model, plan):
            ppl, _ = perplexity(model, heldout)
        rows.append(CompareRow(name, len(plan.consumers), round(cos, 4), round(kl, 4), round(ppl, 3), round(secs, 1),
                               plan.kv_source_layers))
    return rows


def rank_correlation(rows: list[CompareRow]) -> dict[str, float]:
    """Spearman correlation of each calibration metric with held-out perplexity over the compared plans."""
    from scipy.stats import spearmanr

    ppl = [r.heldout_ppl for r in rows]
    return {"cosine": float(spearmanr([-r.calib_cosine for r in rows], ppl).statistic),
            "kl": float(spearmanr([r.calib_kl for r in rows], ppl).statistic)}


def rows_as_dicts(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def compare_maps(stats: str | Path | CalibrationStats, *, target: float | None = 0.3, layers: int | None = None,
                 threshold: float | None = None, seed: int = 0, model=None, dtype: str | None = None,
                 device: str | None = None, json_out: str | Path | None = None, force: bool = False,
                 log: Log | None = None) -> dict[str, Any]:
    """``kvtool search --compare``: every order and layout at one target on the calibrated model, as one report
    (``rows``, the base perplexity, the Spearman correlation of each calibration metric with held-out perplexity);
    written to ``json_out`` when given."""
    if json_out is not None:
        check_writable_file(json_out, force)
    st = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
    m, tok = model_and_tokenizer(model, fallback=st.meta.get("model"), dtype=dtype, device=device)
    if layers is not None:
        target = None
    rows = compare(st, m, tok, target, seed=seed, threshold=threshold, layers=layers, log=log)
    report = {"model": st.meta["model_name"], "target": target if layers is None else layers / st.num_layers,
              "base_ppl": rows[0].heldout_ppl,
              "rows": rows_as_dicts(rows), "spearman": rank_correlation(rows[1:])}
    if json_out is not None:
        write_json_atomic(json_out, {k: report[k] for k in ("target", "rows", "spearman")})
    return report
