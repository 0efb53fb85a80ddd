"""The shape every merge method has: a dataclass holding only its own settings (on top of ``MergeBase``'s budget,
protected and per-layer budgets), with one method, ``reduce``, that maps one layer's prompt KV to ``keep`` entries
per row. ``ScoredEviction`` turns a ``score`` into top-k eviction, so a scoring method is its score alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from kvtool.errors import KvtoolError, quoted
from kvtool.formats.merge_settings import MergeBase
from kvtool.merging.rows import Kept, gather_rows, top_sorted, window_attention


@dataclass
class PromptKV:
    """One layer's prompt at the end of its prefill: ``keys``/``values`` [R, T, D] (R = batch × KV heads, keys after
    RoPE), ``pad`` [R, T] (left padding), and what the attention scores need: the layer's queries [B, Hq, T, D],
    the allowed mask [B, 1|H, T, T] and its scaling. ``attention(window)`` is cached, so methods share it."""

    keys: torch.Tensor
    values: torch.Tensor
    pad: torch.Tensor
    queries: torch.Tensor
    allowed: torch.Tensor
    scaling: float
    _attention: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def attention(self, window: int = 0) -> torch.Tensor:
        """[R, T] the attention each key gets from the last ``window`` prompt queries (0: all: H2O's score)."""
        if window not in self._attention:
            B, Hkv, T = self.queries.shape[0], self.keys.shape[0] // self.queries.shape[0], self.keys.shape[1]
            k = self.keys.view(B, Hkv, T, -1)
            self._attention[window] = window_attention(self.queries, k, self.allowed, self.scaling,
                                                       window).reshape(B * Hkv, T)
        return self._attention[window]


@dataclass
class MergeMethod(MergeBase):
    """A prompt-KV merge method. Subclasses set ``name``, add their own fields, and implement ``reduce``."""

    name: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = True  # False: the method can also run by its own criterion (budget None)

    def reduce(self, kv: PromptKV, keep: int | None) -> Kept:
        """``keep`` entries per row of ``kv`` (None: as many as the method's own criterion keeps)."""
        raise NotImplementedError

    def check(self) -> None:
        """One-line errors for the method's own fields (the shared ones are ``MergeBase.check_shared``'s)."""

    def validate(self) -> MergeMethod:
        self.check_shared()
        if self.budget is None and self.needs_budget:
            raise KvtoolError(f"{self.name} needs a budget")
        for f in fields(self):
            if f.name not in {g.name for g in fields(MergeBase)} and f.type in ("int", "float", "bool"):
                want = {"int": (int,), "float": (int, float), "bool": (bool,)}[f.type]
                x = getattr(self, f.name)
                if not isinstance(x, want) or (f.type != "bool" and isinstance(x, bool)):
                    raise KvtoolError(f"merge settings: {self.name}'s {f.name} must be a {f.type}, got {x!r}")
        self.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_fields(cls, d: dict[str, Any]) -> MergeMethod:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise KvtoolError(f"merge settings: {cls.name} has no setting {quoted(unknown)} (its settings: "
                              f"{', '.join(sorted(known))})")
        return cls(**d).validate()


@dataclass
class ScoredEviction(MergeMethod):
    """Keep each row's ``keep`` best-scored entries; a subclass gives ``score`` [R, T] (padding: -inf)."""

    def score(self, kv: PromptKV, keep: int) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, kv: PromptKV, keep: int | None) -> Kept:
        assert keep is not None
        pos = top_sorted(self.score(kv, keep), keep)
        return Kept(gather_rows(kv.keys, pos), gather_rows(kv.values, pos), pos)
