"""KVMerger thresholds for a plan: per owner layer and KV head, the key-similarity threshold that meets its share of
a merge budget, from the histogram of consecutive-key cosine similarity that ``calibrate`` collects.

A run of k adjacent pairs above the threshold merges k+1 tokens into one entry, so the kept fraction is about
1 - P(sim > threshold). Each layer's share is ``formats.merge_settings.layer_keep`` of the plan, the same formula the
compressor applies: consumers and sliding-window layers store no prompt to merge, protected layers stay whole, and
the other full-attention owners share the rest of the budget.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import DEFAULT_SIGMA, CompressionSettings, layer_keep, protected_layers
from kvtool.formats.plan import SharingPlan
from kvtool.formats.stats import SIM_BINS, CalibrationStats


def threshold_for(hist: torch.Tensor, keep: float) -> float:
    """The lowest similarity threshold whose merges keep at most ``keep`` of the tokens (histogram resolution)."""
    cdf = hist.double().cumsum(-1) / hist.sum().clamp_min(1)
    edges = torch.linspace(-1, 1, SIM_BINS + 1, dtype=torch.float64)
    # fraction above edges[k] is 1 - cdf[k-1]; need 1 - cdf[k-1] >= 1 - keep  <=>  cdf[k-1] <= keep
    ok = [k for k in range(1, SIM_BINS + 1) if cdf[k - 1] <= keep + 1e-12]
    return float(edges[ok[-1]]) if ok else -1.0


def merge_settings(stats: CalibrationStats, budget: float, plan: SharingPlan, sigma: float = DEFAULT_SIGMA) -> dict:
    """The ``merge`` field of ``plan`` for ``budget`` (kept share of the prompt KV), with calibrated thresholds."""
    if not 0 < budget <= 1:
        raise KvtoolError(f"--merge-budget must be in (0, 1], got {budget}")
    hist = stats.tensors["keysim_hist"]  # [L, H, bins]
    L, H = hist.shape[:2]
    prot = protected_layers(L)
    keep = layer_keep(CompressionSettings(budget=budget, protected_layers=prot), plan.kv_source_layers,
                      list(stats.meta["layer_types"]))
    thresholds: list[list[float] | None] = []
    for layer in range(L):
        if keep[layer] is None or keep[layer] >= 1:
            thresholds.append(None)
        else:
            thresholds.append([round(threshold_for(hist[layer, h], keep[layer]), 4) for h in range(H)])
    shares = [k for k in keep if k is not None]
    return {"method": "kvmerger", "budget": budget, "layer_budget": round(shares[0], 6) if shares else 1.0,
            "sigma": sigma, "protected_layers": prot, "thresholds": thresholds}
