"""Row operations every merge method builds on, batched over rows (batch × KV head) and on the rows' device:
the first real tokens, the attention a window of prompt queries gives each key, keeping the best-scored entries,
and merging evicted tokens into the kept ones (merge-on-evict, for any score)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-12


@dataclass
class Kept:
    """What a method keeps of a layer's prompt: ``keys``/``values`` [R, n, D], ``positions`` [R, n] (increasing),
    and ``sizes`` [R, n] (how many tokens each entry stands for; None: one each, no size bias)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor | None = None


def first_real(pad: torch.Tensor, n: int) -> torch.Tensor:
    """[R, T] the first ``n`` non-padding tokens of each row (attention sinks)."""
    real = ~pad
    return real & ((real.long().cumsum(1) - 1) < n)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` [R, T, D] at ``idx`` [R, n] → [R, n, D]."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def top_sorted(score: torch.Tensor, keep: int) -> torch.Tensor:
    """[R, keep] the indices of each row's ``keep`` highest scores, in increasing order."""
    return score.topk(keep, dim=1).indices.sort(dim=1).values


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


def merge_on_evict(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, mass: torch.Tensor,
                   pad: torch.Tensor, min_similarity: float, merge_keys: bool = False) -> Kept:
    """Keep the entries at ``pos`` [R, n] and merge every other real token into the kept real token whose key
    (after RoPE) is the most cosine-similar, if that similarity reaches ``min_similarity`` (otherwise it is
    evicted). A kept entry's value becomes the mean of its members' values weighted by their attention ``mass``
    [R, T] (a dropped member weighs at most as much as the kept one); with ``merge_keys`` its key too. ``sizes``:
    1 plus the members' relative mass, so the size bias gives the entry about the attention mass the group had."""
    R, T, D = keys.shape
    n = pos.shape[1]
    dev = keys.device
    k2, v2 = gather_rows(keys, pos), gather_rows(values, pos)
    sizes = torch.ones(R, n, dtype=torch.float32, device=dev)
    kept = torch.zeros(R, T, dtype=torch.bool, device=dev).scatter_(1, pos, True)
    dropped = ~kept & ~pad
    if n == T or not dropped.any():
        return Kept(k2, v2, pos, sizes)
    mass = mass.float().clamp_min(0).masked_fill(pad, 0.0)
    kn = F.normalize(keys.float(), dim=-1)
    sim = (kn @ gather_rows(kn, pos).transpose(1, 2)).masked_fill(pad.gather(1, pos)[:, None, :], -float("inf"))
    best, target = sim.max(dim=2)  # [R, T]
    joins = dropped & (best >= min_similarity)
    rel = (mass / (mass.gather(1, pos).gather(1, target) + _EPS)).clamp(0.0, 1.0)
    rel = torch.where(joins, rel, torch.zeros_like(rel))
    sizes = sizes + torch.zeros(R, n, dtype=torch.float32, device=dev).scatter_add_(1, target, rel)
    tgt = target[..., None].expand(R, T, D)
    zeros = torch.zeros(R, n, D, dtype=torch.float32, device=dev)
    v_sum = zeros.clone().scatter_add_(1, tgt, rel[..., None] * values.float())
    v2 = ((v2.float() + v_sum) / sizes[..., None]).to(values.dtype)
    if merge_keys:
        k_sum = zeros.scatter_add_(1, tgt, rel[..., None] * keys.float())
        k2 = ((k2.float() + k_sum) / sizes[..., None]).to(keys.dtype)
    return Kept(k2, v2, pos, sizes)
