"""H2O (Zhang et al., 2023), applied once at prefill: a ``recent_share`` of the kept entries goes to the most recent
tokens, the rest to the heavy hitters, the tokens with the highest accumulated attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtool.errors import KvtoolError
from kvtool.merging.methods.base import PromptKV, ScoredEviction


@dataclass
class H2O(ScoredEviction):
    name: ClassVar[str] = "h2o"
    recent_share: float = 0.5

    def check(self) -> None:
        if not 0 <= self.recent_share <= 1:
            raise KvtoolError("h2o: recent_share must be in [0, 1]")

    def score(self, kv: PromptKV, keep: int) -> torch.Tensor:
        T = kv.keys.shape[1]
        score = kv.attention(0).double().clone()
        recent = int(keep * self.recent_share)
        if recent:
            score[:, T - recent :] = float("inf")
        return score.masked_fill(kv.pad, -float("inf"))
