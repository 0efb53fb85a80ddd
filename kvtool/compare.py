"""``kvtool search --compare``: every order and layout at one target, scored the same way, side by side."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from kvtool.calibrate import CalibrationStats
from kvtool.data import heldout_chunks
from kvtool.plan import SharingPlan
from kvtool.quality import perplexity
from kvtool.runtime import sharing
from kvtool.scoring import cosine_score, kl_per_sample, logits_from_hidden


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


def compare(stats: CalibrationStats, model, tokenizer, target: float, *,
            orders=("dissimilar", "similar", "random", "local", "best-first"),
            layouts=("adjacent", "tail", "grouped"), extra: dict[str, dict] | None = None, seed: int = 0,
            threshold: float | None = None, heldout: torch.Tensor | None = None, log=None) -> list[CompareRow]:
    """Search with each order (and ``extra`` search kwargs by name), build each layout, then score all alike."""
    from kvtool.search import search

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
        r = search(stats, model=model, target=target, seed=seed, threshold=threshold, **kw)
        plans.append((name, r.plan, time.time() - t))
        if log:
            log(f"{name}: {r.plan.describe()} ({time.time() - t:.1f} s)")
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
