"""KVMerger's merging step (Wang et al., 2024), per KV head, on keys as stored (after RoPE).

- Merging sets: runs of consecutive tokens whose adjacent keys have cosine similarity above a threshold chain into
  one set (the paper's greedy scan). Protected tokens (attention sinks, a recent window, heavy hitters by
  accumulated attention) never join a set.
- Budget: a head keeps exactly ``keep`` entries. All adjacent pairs above ``eps`` are merged; if that leaves more
  than ``keep`` entries, further pairs are merged in order of decreasing similarity until exactly ``keep`` remain,
  which is the same as lowering this head's threshold to the similarity of the last merged pair. (If ``eps`` alone
  already goes below ``keep``, pairs are merged only down to ``keep``: every head then holds the same number of
  entries, so the cache stays a dense [batch, heads, keep, dim] tensor that really saves memory.)
- Each set collapses to one entry: pivot = the token of the set with the highest accumulated attention; weights
  w_i ∝ exp(-||k_p - k_i||² / 2σ²), normalised over the set; merged key/value = Σ w_i k_i / Σ w_i v_i; the entry
  keeps the pivot's position (used to gather the attention mask; the keys already carry their RoPE rotation).

This module holds the tensor algorithm only; cache integration is not part of this version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergeResult:
    keys: torch.Tensor  # [keep, D]
    values: torch.Tensor  # [keep, D]
    positions: torch.Tensor  # [keep] pivot positions, increasing
    threshold: float  # the effective similarity threshold of this head


def protected_mask(acc: torch.Tensor, sinks: int, recent: int, heavy: int) -> torch.Tensor:
    """Tokens never merged: the first ``sinks``, the last ``recent``, and the ``heavy`` highest accumulated scores."""
    T = acc.shape[0]
    prot = torch.zeros(T, dtype=torch.bool)
    prot[: min(sinks, T)] = True
    if recent:
        prot[max(0, T - recent) :] = True
    if heavy:
        prot[acc.topk(min(heavy, T)).indices] = True
    return prot


def select_pairs(sim: torch.Tensor, protected: torch.Tensor, keep: int, eps: float) -> tuple[torch.Tensor, float]:
    """Which adjacent pairs (t, t+1) to merge so that exactly ``keep`` entries remain (when possible).
    ``sim``: [T-1] cosine similarity of adjacent keys. Returns (bool [T-1], effective threshold)."""
    T = sim.shape[0] + 1
    allowed = ~(protected[:-1] | protected[1:])
    need = max(0, T - keep)  # pairs to merge
    cand = torch.where(allowed, sim, torch.full_like(sim, -float("inf")))
    order = torch.argsort(cand, descending=True, stable=True)
    n_allowed = int(allowed.sum())
    above = int((cand > eps).sum())
    take = min(need, n_allowed) if above < need else need
    chosen = torch.zeros_like(allowed)
    chosen[order[:take]] = True
    thr = float(cand[order[take - 1]]) if take > 0 else float("inf")
    return chosen, thr


def gaussian_merge(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, chosen: torch.Tensor,
                   sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse each run of chosen pairs into one entry (vectorised over sets). Returns (keys, values, positions)."""
    T = keys.shape[0]
    starts = torch.ones(T, dtype=torch.long)
    starts[1:] = (~chosen).long()  # a new set starts wherever the pair before it is not merged
    set_id = starts.cumsum(0) - 1
    n = int(set_id[-1]) + 1
    # pivot of each set: highest accumulated attention (first such token on ties)
    best = torch.full((n,), -float("inf"), dtype=acc.dtype).scatter_reduce(0, set_id, acc, "amax")
    is_best = acc == best[set_id]
    idx = torch.arange(T)
    pivot = torch.full((n,), T, dtype=torch.long).scatter_reduce(0, set_id, torch.where(is_best, idx, T), "amin")
    d2 = (keys.float() - keys[pivot[set_id]].float()).pow(2).sum(-1)
    logw = -d2 / (2 * sigma**2)
    logw = logw - torch.full((n,), -float("inf")).scatter_reduce(0, set_id, logw, "amax")[set_id]
    w = logw.exp()
    w = w / torch.zeros(n).scatter_add(0, set_id, w)[set_id]
    mk = torch.zeros(n, keys.shape[1]).index_add(0, set_id, w[:, None] * keys.float())
    mv = torch.zeros(n, values.shape[1]).index_add(0, set_id, w[:, None] * values.float())
    return mk.to(keys.dtype), mv.to(values.dtype), pivot


def merge_head(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, keep: int, *, eps: float = 0.75,
               sigma: float = 5.0, sinks: int = 4, recent: int = 32, heavy: int = 0) -> MergeResult:
    """Merge one head's prompt KV ([T, D] keys after RoPE, values, accumulated attention [T]) down to ``keep``."""
    sim = torch.nn.functional.cosine_similarity(keys[1:].float(), keys[:-1].float(), dim=-1)
    prot = protected_mask(acc, sinks, recent, heavy)
    chosen, thr = select_pairs(sim, prot, keep, eps)
    k, v, pos = gaussian_merge(keys, values, acc, chosen, sigma)
    return MergeResult(k, v, pos, thr)
