"""StreamingLLM (Xiao et al., 2023): the first ``sinks`` real tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtool.errors import KvtoolError
from kvtool.merging.methods.base import PromptKV, ScoredEviction
from kvtool.merging.rows import first_real


@dataclass
class Streaming(ScoredEviction):
    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def check(self) -> None:
        if self.sinks < 0:
            raise KvtoolError("streaming: sinks must be >= 0")

    def score(self, kv: PromptKV, keep: int) -> torch.Tensor:
        R, T = kv.pad.shape
        pos = torch.arange(T, dtype=torch.float64, device=kv.pad.device).expand(R, T)
        score = torch.where(first_real(kv.pad, self.sinks), torch.full_like(pos, 2.0 * T), pos)
        return score.masked_fill(kv.pad, -1.0)
