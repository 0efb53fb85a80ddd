"""Eviction baselines that keep a subset of the prompt KV, batched over rows (batch × KV head), at a fixed count.

- ``streaming``: StreamingLLM (Xiao et al., 2023): the first ``sinks`` real tokens plus the most recent ones.
- ``h2o``: H2O (Zhang et al., 2023) applied once at prefill: half the budget to the most recent tokens, the other
  half to the heavy hitters, the tokens with the highest accumulated attention.
Left padding is kept only when a row has fewer real tokens than ``keep``; kept indices are returned sorted, so a
row's padded entries stay leading and the same count in every head.
"""

from __future__ import annotations

import torch

from kvtool.merging.kvmerger import first_real


def _top_sorted(score: torch.Tensor, keep: int) -> torch.Tensor:
    return score.topk(keep, dim=1).indices.sort(dim=1).values


def streaming_keep(pad: torch.Tensor, keep: int, sinks: int = 4) -> torch.Tensor:
    """[R, keep] indices: sinks first, then the most recent real tokens."""
    R, T = pad.shape
    pos = torch.arange(T, dtype=torch.float64).expand(R, T)
    score = torch.where(first_real(pad, sinks), torch.full_like(pos, 2.0 * T), pos).masked_fill(pad, -1.0)
    return _top_sorted(score, keep)


def h2o_keep(acc: torch.Tensor, pad: torch.Tensor, keep: int, recent_share: float = 0.5) -> torch.Tensor:
    """[R, keep] indices: the ``recent_share`` most recent tokens plus the heavy hitters by accumulated attention."""
    R, T = acc.shape
    recent = int(keep * recent_share)
    score = acc.double().clone()
    if recent:
        score[:, T - recent :] = float("inf")
    score = score.masked_fill(pad, -float("inf"))
    return _top_sorted(score, keep)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` [R, T, D] at ``idx`` [R, n] → [R, n, D]."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))
