"""``attnmerge``: keep the prompt tokens the last prompt queries attend to most, and merge each dropped token into
its most similar kept one instead of discarding it (beyond the papers; chosen on SmolLM2, see docs/RESULTS.md).

Batched over rows (batch × KV head), at a fixed count per row, like the eviction baselines:

- Score (SnapKV / TOVA style): the attention the last ``window`` prompt queries give each prompt key, summed over
  those queries and the query heads that share the KV head, smoothed along the sequence by an average pool of
  width ``pool`` (1: none). ``window=1`` is TOVA's score, ``window=0`` every prompt query's (H2O's accumulated
  attention). With ``mix`` > 0 (``CompressionSettings``) the compressor adds H2O's score, both scaled to sum to 1
  per row, weighted by ``mix`` (measured worse on SmolLM2, so off by default).
- Kept: the first ``sinks`` real tokens, the last ``recent`` tokens, and the best-scored rest, ``keep`` in all.
- Merged: every dropped real token joins the kept real token whose key (after RoPE) is the most cosine-similar, if
  that similarity reaches ``min_similarity`` (otherwise it is evicted). An entry's value becomes the mean of its
  members' values weighted by their attention mass (the unpooled score; a dropped member weighs at most as much as
  the kept one); with ``merge_keys`` its key too. The kept token's key is kept by default, so its RoPE position
  stays exact.
- ``sizes`` (for the size bias): 1 plus the members' relative mass, so an entry whose dropped members drew
  attention gets + log(1 + Σ m_j / m_p) on its logits and keeps about the attention mass the group had.
- Left padding is kept only when a row has fewer real tokens than ``keep`` (leading, the same count in every head
  of a row) and never merges with a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtool.merging.kvmerger import first_real

_EPS = 1e-12


@dataclass
class AttnMergeResult:
    keys: torch.Tensor  # [R, keep, D]
    values: torch.Tensor  # [R, keep, D]
    positions: torch.Tensor  # [R, keep] kept positions, increasing
    sizes: torch.Tensor  # [R, keep] 1 + the relative attention mass merged into each entry (float)
    merged: torch.Tensor  # [R] dropped tokens merged (the rest were evicted)


def window_attention(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scaling: float,
                     window: int) -> torch.Tensor:
    """[B, Hkv, T] attention each prompt key gets from the last ``window`` prompt queries (all of them when
    ``window`` is 0 or at least T), summed over those queries and the query heads sharing the KV head.
    ``q`` [B, Hq, T, D] and ``k`` [B, Hkv, T, D] after RoPE, ``allowed`` [B, 1|H, T, T] bool."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    w = T if window <= 0 else min(window, T)
    kk = k.float().repeat_interleave(Hq // Hkv, dim=1)
    acc = torch.zeros(B, Hq, T, dtype=torch.float32, device=q.device)
    for s in range(T - w, T, 512):
        e = min(s + 512, T)
        sc = (q[:, :, s:e].float() @ kk.transpose(-1, -2)) * scaling
        sc = sc.masked_fill(~allowed[:, :, s:e], -float("inf"))
        acc += torch.softmax(sc, dim=-1).nan_to_num(0.0).sum(2)
    return acc.view(B, Hkv, Hq // Hkv, T).sum(2)


def attn_merge_rows(keys: torch.Tensor, values: torch.Tensor, score: torch.Tensor, keep: int, *,
                    pad: torch.Tensor | None = None, sinks: int = 4, recent: int = 32, pool: int = 1,
                    min_similarity: float = 0.0, merge: bool = True, merge_keys: bool = False
                    ) -> AttnMergeResult:
    """Keep ``keep`` entries per row of ``keys``/``values`` [R, T, D] by ``score`` [R, T] (attention mass, >= 0)
    and merge the dropped tokens into the kept ones (``merge=False``: plain eviction by the same score)."""
    R, T, D = keys.shape
    pad = torch.zeros(R, T, dtype=torch.bool, device=keys.device) if pad is None else pad
    keep = min(max(int(keep), 1), T)
    mass = score.float().clamp_min(0).masked_fill(pad, 0.0)
    rank = mass
    if pool > 1:
        rank = F.avg_pool1d(mass[:, None], pool, stride=1, padding=pool // 2, count_include_pad=False)[:, 0, :T]
    rank = rank.double()
    top = float(rank.max()) + 1.0 if rank.numel() else 1.0
    prot = first_real(pad, sinks)
    if recent:
        prot[:, max(0, T - recent):] = True
    rank = torch.where(prot, torch.full_like(rank, top) + torch.arange(T, device=rank.device) / T, rank)
    rank = rank.masked_fill(pad, -float("inf"))
    pos = rank.topk(keep, dim=1).indices.sort(dim=1).values
    kept_mask = torch.zeros(R, T, dtype=torch.bool, device=keys.device).scatter_(1, pos, True)
    gather = lambda x: x.gather(1, pos[..., None].expand(R, keep, x.shape[-1]))  # noqa: E731
    k2, v2 = gather(keys), gather(values)
    sizes = torch.ones(R, keep, dtype=torch.float32, device=keys.device)
    dropped = ~kept_mask & ~pad
    n_merged = torch.zeros(R, dtype=torch.long, device=keys.device)
    if not merge or keep == T or not dropped.any():
        return AttnMergeResult(k2, v2, pos, sizes, n_merged)
    kn = F.normalize(keys.float(), dim=-1)
    kept_n = gather(kn)  # [R, keep, D]
    kept_pad = pad.gather(1, pos)
    sim = kn @ kept_n.transpose(1, 2)  # [R, T, keep]
    sim = sim.masked_fill(kept_pad[:, None, :], -float("inf"))
    best, target = sim.max(dim=2)  # [R, T]
    joins = dropped & (best >= min_similarity)
    n_merged = joins.sum(1)
    m_keep = mass.gather(1, pos)  # [R, keep]
    rel = (mass / (m_keep.gather(1, target) + _EPS)).clamp(0.0, 1.0)
    rel = torch.where(joins, rel, torch.zeros_like(rel))
    add = torch.zeros(R, keep, dtype=torch.float32, device=keys.device).scatter_add_(1, target, rel)
    sizes = sizes + add
    tgt = target[..., None].expand(R, T, D)
    v_sum = torch.zeros(R, keep, D, dtype=torch.float32, device=keys.device).scatter_add_(
        1, tgt, rel[..., None] * values.float())
    v2 = ((v2.float() + v_sum) / sizes[..., None]).to(values.dtype)
    if merge_keys:
        k_sum = torch.zeros(R, keep, D, dtype=torch.float32, device=keys.device).scatter_add_(
            1, tgt, rel[..., None] * keys.float())
        k2 = ((k2.float() + k_sum) / sizes[..., None]).to(keys.dtype)
    return AttnMergeResult(k2, v2, pos, sizes, n_merged)
