"""Per-layer merge budgets for a plan, from the consecutive-key similarity that ``calibrate`` collects (opt-in:
``search --merge-allocation calibrated``; on SmolLM2 the even split reads better and retrieves as well or better,
docs/RESULTS.md "Calibrated merge budgets", so it is the default).

KVMerger's merging sets are runs of consecutive tokens whose keys are alike, so a layer whose consecutive keys are
more alike can merge more for the same loss. With one similarity threshold τ for the whole model, layer l merges
the adjacent pairs above τ and keeps about ``1 - P_l(sim > τ)`` of its prompt (from its histogram, pooled over its
KV heads: a layer's heads keep the same count so its cache stays dense). τ is set by bisection so that the merged
layers' shares average the even share the budget leaves them (``formats.merge_settings.layer_shares``), each share
kept within [MIN_SHARE, 1]. The plan stores the shares (``layer_budgets``); ``layer_counts`` turns them into exact
counts at run time, so the total stays the budget.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import MIN_SHARE, layer_shares
from kvtool.formats.plan import SharingPlan
from kvtool.formats.stats import CalibrationStats
from kvtool.merging.methods import MergeMethod, make_method

ALLOCATIONS = ("calibrated", "even")


def kept_share(hist: torch.Tensor, tau: float) -> float:
    """The share of tokens a layer keeps when it merges its adjacent pairs above ``tau`` (histogram [bins] over
    [-1, 1], linear within a bin)."""
    bins = hist.shape[-1]
    h = hist.double() / hist.sum().clamp_min(1)
    x = (tau + 1) * bins / 2  # position in bins
    k = int(min(max(x, 0), bins))
    below = float(h[:k].sum()) + (float(h[k]) * (x - k) if k < bins else 0.0)
    return min(1.0, max(MIN_SHARE, below))


def calibrated_shares(hists: list[torch.Tensor], even: float) -> list[float]:
    """One share per merged layer (their histograms), averaging ``even``: one threshold for the whole model."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        tau = (lo + hi) / 2
        if sum(kept_share(h, tau) for h in hists) / len(hists) < even:
            lo = tau
        else:
            hi = tau
    shares = [kept_share(h, hi) for h in hists]
    scale = even * len(hists) / sum(shares)  # the bisection's last step, spread evenly: the mean is exact
    return [round(min(1.0, max(MIN_SHARE, s * scale)), 6) for s in shares]


def merge_settings(stats: CalibrationStats, budget: float, plan: SharingPlan, method: str = "kvmerger",
                   allocation: str = "even") -> dict:
    """The ``merge`` field of ``plan``: ``method`` at ``budget`` (kept share of the prompt KV), with per-layer
    budgets from the key similarity (``allocation="calibrated"``) or every merged layer alike (``"even"``)."""
    if not 0 < budget <= 1:
        raise KvtoolError(f"--merge-budget must be in (0, 1], got {budget}")
    if allocation not in ALLOCATIONS:
        raise KvtoolError(f"unknown merge allocation {allocation!r}; use {' or '.join(ALLOCATIONS)}")
    m: MergeMethod = make_method(method, budget=budget)
    types = list(stats.meta["layer_types"])
    if allocation == "calibrated":
        shares = layer_shares(m, plan.kv_source_layers, types, plan.k_source_layers, plan.v_source_layers)
        merged = [i for i, s in enumerate(shares) if s is not None]
        if merged:
            hist = stats.tensors["keysim_hist"]  # [L, H, bins]
            if hist.shape[0] != len(shares):
                raise KvtoolError(f"the calibration covers {hist.shape[0]} layers, the plan {len(shares)}")
            even = float(shares[merged[0]])
            got = calibrated_shares([hist[i].sum(0) for i in merged], even)
            lb: list[float | None] = [None] * len(shares)
            for i, s in zip(merged, got, strict=True):
                lb[i] = s
            m.layer_budgets = lb
    return m.validate().to_dict()
