"""KVMerger (Wang et al., 2024): merge runs of consecutive tokens whose keys are alike, with Gaussian-kernel weights.

On keys as stored (after RoPE), batched over rows (batch × KV head):
- Merging sets: runs of consecutive tokens whose adjacent keys have cosine similarity above a threshold chain into
  one set (the paper's greedy scan). Protected tokens (the first ``sinks`` real tokens, the last ``recent``, and
  the ``heavy`` share of the kept entries with the highest accumulated attention) never join a set.
- Budget: every row keeps exactly ``keep`` entries, so the cache stays a dense [batch, heads, keep, dim] tensor
  that really saves memory. A row merges its adjacent pairs in order of decreasing similarity until ``keep``
  entries remain: the same as moving that head's threshold to the similarity of the last pair merged (returned as
  the row's effective threshold). How many entries each layer keeps is ``MergeBase``'s: calibrated from the keys'
  similarity by ``search --merge-budget`` (``layer_budgets``), so a layer whose keys are more alike merges more.
  Pairs that touch a protected token merge only if the others cannot reach the budget (tiny prompts). With no
  budget, a row merges the pairs above ``eps`` (the paper's constant), to the largest count any row keeps then.
- Left padding: padded positions only merge with each other and never with a real token, so each row's padded
  entries stay leading and the same count in every head of that row.
- Each set collapses to one entry: pivot = the token of the set with the highest accumulated attention; weights
  w_i ∝ exp(-||k_p - k_i||² / 2σ²), normalised over the set; merged key/value = Σ w_i k_i / Σ w_i v_i, at the
  pivot's position (the keys already carry their RoPE rotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtool.errors import KvtoolError
from kvtool.merging.methods.base import MergeMethod, PromptKV
from kvtool.merging.rows import Kept, first_real

_PAD_PAIR = 4.0  # priority of a pad-pad pair (cosine similarity is at most 1)
_PROTECTED = -4.0  # offset of pairs that touch a protected token: merged only as a last resort


@dataclass
class KVMerger(MergeMethod):
    name: ClassVar[str] = "kvmerger"
    needs_budget: ClassVar[bool] = False
    eps: float = 0.75  # the paper's similarity threshold, used only without a budget
    sigma: float = 5.0  # Gaussian kernel width of the merge (paper: σ ≈ 5)
    sinks: int = 4  # first real tokens never merged
    recent: int = 32  # most recent tokens never merged (at most a quarter of the kept entries)
    heavy: float = 0.25  # share of the kept entries reserved for heavy hitters (accumulated attention)
    size_bias: bool = False  # beyond the paper: + log m on the logits of an entry of m merged tokens

    def check(self) -> None:
        if self.sigma <= 0 or self.sinks < 0 or self.recent < 0 or not 0 <= self.heavy <= 0.75:
            raise KvtoolError("kvmerger: sigma must be > 0, sinks and recent >= 0, heavy in [0, 0.75]")

    def reduce(self, kv: PromptKV, keep: int | None) -> Kept:
        T = kv.keys.shape[1]
        cap = T if keep is None else keep
        r = merge_rows(kv.keys, kv.values, kv.attention(0), keep, pad=kv.pad, eps=self.eps, sigma=self.sigma,
                       sinks=self.sinks, recent=min(self.recent, cap // 4), heavy=int(self.heavy * cap))
        return Kept(r.keys, r.values, r.positions, r.sizes if self.size_bias else None)


@dataclass
class MergeResult:
    keys: torch.Tensor  # [R, keep, D]
    values: torch.Tensor  # [R, keep, D]
    positions: torch.Tensor  # [R, keep] pivot positions, increasing
    threshold: torch.Tensor  # [R] the effective similarity threshold of each row
    sizes: torch.Tensor  # [R, keep] tokens merged into each entry


def protected_mask(acc: torch.Tensor, sinks: int, recent: int, heavy: int,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
    """[R, T] tokens never merged: the first ``sinks`` real tokens, the last ``recent`` tokens, and the ``heavy``
    highest accumulated scores."""
    R, T = acc.shape
    pad = torch.zeros(R, T, dtype=torch.bool, device=acc.device) if pad is None else pad
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
    chosen = torch.zeros(R, P, dtype=torch.bool, device=score.device)
    if need <= 0:
        return chosen, torch.full((R,), float("inf"), device=score.device)
    top = score.topk(need, dim=1)
    if torch.isinf(top.values[:, -1]).any():
        raise ValueError(f"cannot merge down to {keep} entries: padding and real tokens never merge")
    chosen.scatter_(1, top.indices, True)
    return chosen, top.values[:, -1]


def entries_above(score: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """[R] entries each row keeps when it merges exactly the pairs whose similarity exceeds ``eps``."""
    eps = torch.as_tensor(eps, dtype=score.dtype, device=score.device).reshape(-1, 1)
    return score.shape[1] + 1 - (score > eps).sum(1)


def gaussian_merge(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, chosen: torch.Tensor,
                   sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse each run of chosen pairs into one entry; every row must end with the same number of sets.
    ``keys``/``values`` [R, T, D], ``acc`` [R, T], ``chosen`` [R, T-1]. Returns (keys, values, pivot positions)."""
    R, T, D = keys.shape
    dev = keys.device
    starts = torch.ones(R, T, dtype=torch.long, device=dev)
    starts[:, 1:] = (~chosen).long()  # a new set starts wherever the pair before it is not merged
    set_id = starts.cumsum(1) - 1
    n = int(set_id[0, -1]) + 1
    if not torch.all(set_id[:, -1] == n - 1):
        raise ValueError("rows end with different numbers of merging sets")
    flat = (set_id + n * torch.arange(R, device=dev)[:, None]).flatten()  # [R*T] global set index
    a = acc.float().flatten()
    # pivot of each set: highest accumulated attention (first such token on ties)
    best = torch.full((R * n,), -float("inf"), device=dev).scatter_reduce(0, flat, a, "amax")
    idx = torch.arange(T, device=dev).repeat(R)
    pivot = torch.full((R * n,), T, dtype=torch.long, device=dev).scatter_reduce(
        0, flat, torch.where(a == best[flat], idx, T), "amin")
    k = keys.reshape(R * T, D).float()
    v = values.reshape(R * T, D).float()
    row_base = (torch.arange(R, device=dev) * T).repeat_interleave(n)
    d2 = (k - k[(pivot + row_base)[flat]]).pow(2).sum(-1)
    logw = -d2 / (2 * sigma**2)
    logw = logw - torch.full((R * n,), -float("inf"), device=dev).scatter_reduce(0, flat, logw, "amax")[flat]
    w = logw.exp()
    w = w / torch.zeros(R * n, device=dev).scatter_add(0, flat, w)[flat]
    mk = torch.zeros(R * n, D, device=dev).index_add(0, flat, w[:, None] * k)
    mv = torch.zeros(R * n, D, device=dev).index_add(0, flat, w[:, None] * v)
    return (mk.view(R, n, D).to(keys.dtype), mv.view(R, n, D).to(values.dtype), pivot.view(R, n))


def merge_rows(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, keep: int | None, *,
               pad: torch.Tensor | None = None, eps: float = KVMerger.eps, sigma: float = KVMerger.sigma,
               sinks: int = KVMerger.sinks, recent: int = KVMerger.recent, heavy: int = 0) -> MergeResult:
    """Merge rows of prompt KV ([R, T, D] keys after RoPE, values, accumulated attention [R, T]) down to ``keep``
    entries each. ``keep=None`` merges by the threshold ``eps`` alone, to the largest count any row keeps then (so
    the rows stay dense: rows with more similar pairs merge only their most similar ones)."""
    R, T, _ = keys.shape
    dev = keys.device
    pad = torch.zeros(R, T, dtype=torch.bool, device=dev) if pad is None else pad
    score = pair_scores(keys, protected_mask(acc, sinks, recent, heavy, pad), pad)
    if keep is None:
        keep = int(entries_above(score, eps).max())
    keep = min(max(keep, 2 if pad.any() else 1), T)  # padding and real tokens never share an entry
    if keep == T:
        return MergeResult(keys, values, torch.arange(T, device=dev).expand(R, T),
                           torch.full((R,), float("inf"), device=dev), torch.ones(R, T, dtype=torch.long, device=dev))
    chosen, thr = select_pairs(score, keep)
    k, v, pos = gaussian_merge(keys, values, acc.masked_fill(pad, 0), chosen, sigma)
    starts = torch.cat([torch.ones(R, 1, dtype=torch.long, device=dev), (~chosen).long()], dim=1)
    ones = torch.ones(R, T, dtype=torch.long, device=dev)
    sizes = torch.zeros(R, keep, dtype=torch.long, device=dev).scatter_add_(1, starts.cumsum(1) - 1, ones)
    return MergeResult(k, v, pos, thr, sizes)


def merge_head(keys: torch.Tensor, values: torch.Tensor, acc: torch.Tensor, keep: int | None, **kw) -> MergeResult:
    """One head's prompt KV ([T, D]); the result has the row dimension dropped."""
    r = merge_rows(keys[None], values[None], acc[None], keep, **kw)
    return MergeResult(r.keys[0], r.values[0], r.positions[0], r.threshold[0], r.sizes[0])
