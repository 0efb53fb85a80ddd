"""Merging settings for a plan: per layer and KV head, the key-similarity threshold that meets a merge budget.

Calibrated from the histogram of consecutive-key cosine similarity that ``calibrate`` collects. A run of k adjacent
pairs above the threshold merges k+1 tokens into one entry, so the kept fraction is about 1 - P(sim > threshold).
Following KVMerger, the first two layers and the last layer are not merged; to still meet the budget over the whole
model, the merged layers get a proportionally tighter per-layer budget.
"""

from __future__ import annotations

import torch

from kvtool.calibrate import SIM_BINS, CalibrationStats
from kvtool.errors import KvtoolError

DEFAULT_SIGMA = 5.0


def protected_layers(num_layers: int) -> list[int]:
    return sorted({0, 1, num_layers - 1} & set(range(num_layers)))


def layer_budget(budget: float, num_layers: int, protected: int) -> float:
    """Per merged layer budget so that the model-wide kept fraction is ``budget``."""
    merged = num_layers - protected
    if merged <= 0:
        return 1.0
    return max(0.0, min(1.0, (budget * num_layers - protected) / merged))


def threshold_for(hist: torch.Tensor, keep: float) -> float:
    """The lowest similarity threshold whose merges keep at most ``keep`` of the tokens (histogram resolution)."""
    cdf = hist.double().cumsum(-1) / hist.sum().clamp_min(1)
    edges = torch.linspace(-1, 1, SIM_BINS + 1, dtype=torch.float64)
    # fraction above edges[k] is 1 - cdf[k-1]; need 1 - cdf[k-1] >= 1 - keep  <=>  cdf[k-1] <= keep
    ok = [k for k in range(1, SIM_BINS + 1) if cdf[k - 1] <= keep + 1e-12]
    return float(edges[ok[-1]]) if ok else -1.0


def merge_settings(stats: CalibrationStats, budget: float, sigma: float = DEFAULT_SIGMA) -> dict:
    if not 0 < budget <= 1:
        raise KvtoolError(f"--merge-budget must be in (0, 1], got {budget}")
    hist = stats.tensors["keysim_hist"]  # [L, H, bins]
    L, H = hist.shape[:2]
    prot = protected_layers(L)
    per_layer = layer_budget(budget, L, len(prot))
    thresholds: list[list[float] | None] = []
    for layer in range(L):
        if layer in prot or budget >= 1:
            thresholds.append(None)
        else:
            thresholds.append([round(threshold_for(hist[layer, h], per_layer), 4) for h in range(H)])
    return {"method": "kvmerger", "budget": budget, "layer_budget": round(per_layer, 6), "sigma": sigma,
            "protected_layers": prot, "thresholds": thresholds}
