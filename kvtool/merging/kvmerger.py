"""KVMerger's merging step (Wang et al., 2024) on keys as stored (after RoPE), batched over rows (batch × KV head).

- Merging sets: runs of consecutive tokens whose adjacent keys have cosine similarity above a threshold chain into
  one set (the paper's greedy scan). Protected tokens (the first ``sinks`` real tokens, the last ``recent``, and
  the ``heavy`` highest accumulated-attention tokens) never join a set.
- Budget: every row keeps exactly ``keep`` entries, so the cache stays a dense [batch, heads, keep, dim] tensor
  that really saves memory. The row merges its adjacent pairs in order of decreasing similarity until ``keep``
  entries remain: the same as lowering (or raising) that head's threshold to the similarity of the last pair
  merged, which is returned as the row's effective threshold. Pairs that touch a protected token are merged only
  if the unprotected ones cannot reach the budget (tiny prompts).
- Left padding: padded positions only merge with each other (first, they are masked anyway) and never with a
  real token, so each row's padded entries stay leading and the same count in every head of that row.
- Each set collapses to one entry: pivot = the token of the set with the highest accumulated attention; weights
  w_i ∝ exp(-||k_p - k_i||² / 2σ²), normalised over the set; merged key/value = Σ w_i k_i / Σ w_i v_i. The pivot's
  position is returned with each entry; the keys already carry their RoPE rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.formats.merge_settings import DEFAULT_EPS, DEFAULT_RECENT, DEFAULT_SIGMA, DEFAULT_SINKS

_PAD_PAIR = 4.0  # priority of a pad-pad pair (cosine similarity is at most 1)
_PROTECTED = -4.0  # offset of pairs that touch a protected token: merged only as a last resort


@dataclass
class MergeResult:
    keys: torch.Tensor  # [R, keep, D]
    values: torch.Tensor  # [R, keep, D]
    positions: torch.Tensor  # [R, keep] pivot positions, increasing
    threshold: torch.Tensor  # [R] the effective similarity threshold of each row
    sizes: torch.Tensor | None = None  # [R, keep] tokens merged into each entry


def first_real(pad: torch.Tensor, n: int) -> torch.Tensor:
    """[R, T] the first ``n`` non-padding tokens of each row (attention sinks)."""
    real = ~pad
    return real & ((real.long().cumsum(1) - 1) < n)


def protected_mask(acc: torch.Tensor, sinks: int, recent: int, heavy: int,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
    """[R, T] tokens never merged: the first ``sinks`` real tokens, the last ``recent`` tokens, and the ``heavy``
    highest accumulated scores."""
    R, T = acc.shape
    pad = torch.zeros(R, T, dtype=torch.bool) if pad is None else pad
    prot = first_real(pad, sinks)
    if recent:
        prot[:, max(0, T - recent) :] = True
    if heavy:
        score = acc.float().masked_fill(pad, -float("inf"))
        prot.scatter_(1, score.topk(min(heavy, T), dim=1).indices, True)
    return prot & ~pad


def pair_scores(keys: torch.Tensor, protected: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """[R, T-1] merge priority of each adjacent pair: pad-pad first, then unprotected by cosine similarity, then
    protected ones; a pair across the pad/real boundary never merges (-inf)."""
    sim = torch.nn.functional.cosine_similarity(keys[:, 1:].float(), keys[:, :-1].float(), dim=-1)
    touch = protected[:, 1:] | protected[:, :-1]
    score = torch.where(touch, sim + _PROTECTED, sim)
    score = torch.where(pad[:, 1:] & pad[:, :-1], torch.full_like(sim, _PAD_PAIR), score)
    return score.masked_fill(pad[:, 1:] != pad[:, :-1], -float("inf"))


def select_pairs(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ``T - keep`` highest-priority adjacent pairs of each row, so exactly ``keep`` entries remain.
    Returns (chosen bool [R, T-1], effective threshold [R]: the score of the last pair merged)."""
    R, P = score.shape
    need = P + 1 - keep
    chosen = torch.zeros(R, P, dtype=torch.bool)
    if need <= 0:
        return chosen, torch.full((R,), float("inf"))
    top = score.topk(need, dim=1)
    if torch.isinf(top.values[:, -1]).any():
        raise ValueError(f"cannot merge down to {keep} entries: padding and real tokens never merge")
    chosen.scatter_(1, top.indices, True)
    return chosen, top.values[:, -1]


def entries_above(score: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """[R] entries each row keeps when it merges exactly the pairs whose similarity exceeds ``eps`` (a float, or
    one threshold per row)."""
    eps = torch.as_tensor(eps, dtype=score.dtype).reshape(-1, 1)
    return score.shape[1] + 1 - (score > eps).sum(1)


def gaussian_merge(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, chosen: torch.Tensor,
                   sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse each run of chosen pairs into one entry; every row must end with the same number of sets.
    ``keys``/``values`` [R, T, D], ``acc`` [R, T], ``chosen`` [R, T-1]. Returns (keys, values, pivot positions)."""
    R, T, D = keys.shape
    starts = torch.ones(R, T, dtype=torch.long)
    starts[:, 1:] = (~chosen).long()  # a new set starts wherever the pair before it is not merged
    set_id = starts.cumsum(1) - 1
    n = int(set_id[0, -1]) + 1
    if not torch.all(set_id[:, -1] == n - 1):
        raise ValueError("rows end with different numbers of merging sets")
    flat = (set_id + n * torch.arange(R)[:, None]).flatten()  # [R*T] global set index
    a = acc.float().flatten()
    # pivot of each set: highest accumulated attention (first such token on ties)
    best = torch.full((R * n,), -float("inf")).scatter_reduce(0, flat, a, "amax")
    idx = torch.arange(T).repeat(R)
    pivot = torch.full((R * n,), T, dtype=torch.long).scatter_reduce(0, flat, torch.where(a == best[flat], idx, T),
                                                                     "amin")
    k = keys.reshape(R * T, D).float()
    v = values.reshape(R * T, D).float()
    row_base = (torch.arange(R) * T).repeat_interleave(n)
    d2 = (k - k[(pivot + row_base)[flat]]).pow(2).sum(-1)
    logw = -d2 / (2 * sigma**2)
    logw = logw - torch.full((R * n,), -float("inf")).scatter_reduce(0, flat, logw, "amax")[flat]
    w = logw.exp()
    w = w / torch.zeros(R * n).scatter_add(0, flat, w)[flat]
    mk = torch.zeros(R * n, D).index_add(0, flat, w[:, None] * k)
    mv = torch.zeros(R * n, D).index_add(0, flat, w[:, None] * v)
    return (mk.view(R, n, D).to(keys.dtype), mv.view(R, n, D).to(values.dtype), pivot.view(R, n))


def merge_rows(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, keep: int | None, *,
               pad: torch.Tensor | None = None, eps: float | torch.Tensor = DEFAULT_EPS, sigma: float = DEFAULT_SIGMA,
               sinks: int = DEFAULT_SINKS, recent: int = DEFAULT_RECENT, heavy: int = 0) -> MergeResult:
    """Merge rows of prompt KV ([R, T, D] keys after RoPE, values, accumulated attention [R, T]) down to ``keep``
    entries each. ``keep=None`` merges by the threshold ``eps`` alone, to the largest count any row keeps then (so
    the rows stay dense: rows with more similar pairs merge only their most similar ones)."""
    R, T, _ = keys.shape
    pad = torch.zeros(R, T, dtype=torch.bool) if pad is None else pad
    score = pair_scores(keys, protected_mask(acc, sinks, recent, heavy, pad), pad)
    if keep is None:
        keep = int(entries_above(score, eps).max())
    keep = min(max(keep, 2 if pad.any() else 1), T)  # padding and real tokens never share an entry
    if keep == T:
        return MergeResult(keys, values, torch.arange(T).expand(R, T), torch.full((R,), float("inf")),
                           torch.ones(R, T, dtype=torch.long))
    chosen, thr = select_pairs(score, keep)
    k, v, pos = gaussian_merge(keys, values, acc.masked_fill(pad, 0), chosen, sigma)
    starts = torch.cat([torch.ones(R, 1, dtype=torch.long), (~chosen).long()], dim=1)
    ones = torch.ones(R, T, dtype=torch.long)
    sizes = torch.zeros(R, keep, dtype=torch.long).scatter_add_(1, starts.cumsum(1) - 1, ones)
    return MergeResult(k, v, pos, thr, sizes)


def merge_head(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, keep: int | None, **kw) -> MergeResult:
    """One head's prompt KV ([T, D]); the result has the row dimension dropped."""
    r = merge_rows(keys[None], values[None], acc[None], keep, **kw)
    return MergeResult(r.keys[0], r.values[0], r.positions[0], r.threshold[0], r.sizes[0])
