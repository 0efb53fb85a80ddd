"""``attnmerge``: evict by the attention of the last prompt queries, and merge each evicted token into its most
similar kept one instead of discarding it (beyond the papers; chosen on SmolLM2, see docs/RESULTS.md). It is
merge-on-evict (``rows.merge_on_evict``) around a windowed attention score, so any score merges the same way.

- Score (SnapKV / TOVA style): the attention the last ``window`` prompt queries give each prompt key, summed over
  those queries and the query heads that share the KV head, smoothed along the sequence by an average pool of
  width ``pool`` (1: none). ``window=1`` is TOVA's score, ``window=0`` every prompt query's (H2O's). With ``mix``
  > 0, H2O's score is added, both scaled to sum to 1 per row (measured worse on SmolLM2, so off by default).
- Kept: the first ``sinks`` real tokens, the most recent ``max(min(recent, keep // 4), recent_share · keep)``
  tokens, and the best-scored rest.
- Merged: an evicted real token joins the kept token whose key is the most similar, if their cosine reaches
  ``min_similarity``; values are averaged by attention mass (``merge_keys``: keys too; by default the kept key
  stays, so its RoPE position stays exact). ``size_bias`` gives each entry + log(size) on its logits.
- Every layer is merged by default (``protected_layers=[]``): keeping layers 0, 1 and L-1 whole cost it quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvtool.errors import KvtoolError
from kvtool.merging.methods.base import PromptKV, ScoredEviction
from kvtool.merging.rows import Kept, first_real, merge_on_evict, top_sorted


def _unit(score: torch.Tensor) -> torch.Tensor:
    """Each row of ``score`` [R, T] scaled to sum to 1."""
    return score / score.sum(-1, keepdim=True).clamp_min(1e-12)


@dataclass
class AttnMerge(ScoredEviction):
    name: ClassVar[str] = "attnmerge"
    protected_layers: list[int] | None = field(default_factory=list)
    window: int = 64
    pool: int = 5
    mix: float = 0.0
    sinks: int = 4
    recent: int = 32
    recent_share: float = 0.0
    min_similarity: float = 0.9
    merge_keys: bool = False
    size_bias: bool = True

    def check(self) -> None:
        if (self.window < 0 or self.pool < 1 or not -1 <= self.min_similarity <= 1 or self.sinks < 0
                or self.recent < 0 or not 0 <= self.recent_share <= 0.9 or self.mix < 0):
            raise KvtoolError("attnmerge: window >= 0, pool >= 1, min_similarity in [-1, 1], sinks and recent >= 0, "
                              "recent_share in [0, 0.9] and mix >= 0")

    def mass(self, kv: PromptKV) -> torch.Tensor:
        """[R, T] attention mass of each token (the merge weights)."""
        m = kv.attention(self.window)
        if self.mix > 0:
            m = _unit(m) + self.mix * _unit(kv.attention(0))
        return m.float().clamp_min(0).masked_fill(kv.pad, 0.0)

    def score(self, kv: PromptKV, keep: int) -> torch.Tensor:
        mass = self.mass(kv)
        T = mass.shape[1]
        rank = mass
        if self.pool > 1:
            rank = F.avg_pool1d(mass[:, None], self.pool, stride=1, padding=self.pool // 2,
                                count_include_pad=False)[:, 0, :T]
        rank = rank.double()
        top = float(rank.max()) + 1.0 if rank.numel() else 1.0
        recent = max(min(self.recent, keep // 4), math.floor(self.recent_share * keep))
        prot = first_real(kv.pad, self.sinks)
        if recent:
            prot[:, max(0, T - recent):] = True
        rank = torch.where(prot, top + torch.arange(T, device=rank.device, dtype=rank.dtype) / T, rank)
        return rank.masked_fill(kv.pad, -float("inf"))

    def reduce(self, kv: PromptKV, keep: int | None) -> Kept:
        assert keep is not None
        pos = top_sorted(self.score(kv, keep), keep)
        kept = merge_on_evict(kv.keys, kv.values, pos, self.mass(kv), kv.pad, self.min_similarity, self.merge_keys)
        return kept if self.size_bias else Kept(kept.keys, kept.values, kept.positions)
