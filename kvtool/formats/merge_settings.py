"""Prompt-KV compression settings (KVMerger, attnmerge, or the H2O / StreamingLLM eviction baselines) and the
per-layer share of the prompt each owner layer keeps. Pure data: the compressor that applies them is ``kvtool.merging``.

``budget`` is the kept share of the prompt KV the model stores in its full-attention owner layers. Consumers store
nothing and sliding-window layers keep their bounded window, so neither counts; the protected layers (KVMerger's
first two and last) stay whole, and the other owners keep a proportionally smaller share so the total meets the
budget (``layer_keep``: the one formula, used both to compress and to calibrate thresholds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from kvtool.errors import KvtoolError, quoted

METHODS = ("kvmerger", "h2o", "streaming", "attnmerge")
# KVMerger's constants (paper: ε = 0.75, σ ≈ 5), and the tokens every method leaves whole
DEFAULT_EPS = 0.75
DEFAULT_SIGMA = 5.0
DEFAULT_SINKS = 4
DEFAULT_RECENT = 32
DEFAULT_HEAVY = 0.25
# attnmerge's (kvtool.merging.attnmerge): observation window, score smoothing, least key similarity to merge
DEFAULT_WINDOW = 64
DEFAULT_POOL = 5
DEFAULT_MIN_SIMILARITY = 0.9
_INFO_KEYS = {"layer_budget"}  # written by `search --merge-budget` for reading, recomputed at load


def protected_layers(num_layers: int) -> list[int]:
    """KVMerger leaves the first two layers and the last one unmerged."""
    return sorted({0, 1, num_layers - 1} & set(range(num_layers)))


@dataclass
class CompressionSettings:
    method: str = "kvmerger"
    budget: float | None = 0.5  # kept share of the prompt KV; None: merge by threshold alone (kvmerger only)
    eps: float = DEFAULT_EPS  # KVMerger's similarity threshold when no budget (or no calibrated threshold) is given
    sigma: float = DEFAULT_SIGMA  # Gaussian kernel width of the merge
    sinks: int = DEFAULT_SINKS  # first real tokens never merged / always kept (StreamingLLM)
    recent: int = DEFAULT_RECENT  # most recent prompt tokens never merged (capped at a quarter of the kept entries)
    heavy: float = DEFAULT_HEAVY  # share of the kept entries reserved for heavy hitters (accumulated attention)
    # beyond the paper: an entry of m merged tokens gets + log m on its attention logits (None: on for attnmerge only)
    size_bias: bool | None = None
    protected_layers: list[int] | None = None  # None: KVMerger's first two and last layers (attnmerge: none)
    thresholds: list[list[float] | None] | None = None  # calibrated per layer and KV head (`search --merge-budget`)
    # attnmerge only: score = attention of the last `window` prompt queries (0: all), average-pooled over `pool`
    # tokens; a dropped token merges into its most similar kept one if their key cosine reaches `min_similarity`
    window: int = DEFAULT_WINDOW
    pool: int = DEFAULT_POOL
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    merge_keys: bool = False  # attnmerge: average keys too (default: values only, keys stay the kept token's)
    recent_share: float = 0.0  # attnmerge: share of the kept entries always given to the most recent tokens
    # attnmerge: weight of H2O's score (every prompt query's attention) added to the window's, each summing to 1
    mix: float = 0.0

    def __post_init__(self) -> None:
        # attnmerge's own defaults: every layer compressed alike (keeping layers 0, 1 and L-1 whole cost it quality
        # on SmolLM2), and the size bias on
        if self.method == "attnmerge" and self.protected_layers is None:
            self.protected_layers = []
        if self.size_bias is None:
            self.size_bias = self.method == "attnmerge"

    def validate(self) -> CompressionSettings:
        if self.method not in METHODS:
            raise KvtoolError(f"unknown compression method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.budget is None:
            if self.method != "kvmerger":
                raise KvtoolError(f"{self.method} needs a budget")
        elif not 0 < self.budget <= 1:
            raise KvtoolError(f"merge budget must be in (0, 1], got {self.budget}")
        if self.sigma <= 0 or self.sinks < 0 or self.recent < 0 or not 0 <= self.heavy <= 0.75:
            raise KvtoolError("compression: sigma must be > 0, sinks/recent >= 0 and heavy in [0, 0.75]")
        if (self.window < 0 or self.pool < 1 or not -1 <= self.min_similarity <= 1
                or not 0 <= self.recent_share <= 0.9 or self.mix < 0):
            raise KvtoolError("compression: window must be >= 0, pool >= 1, min_similarity in [-1, 1], "
                              "recent_share in [0, 0.9] and mix >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> CompressionSettings:
        if not isinstance(d, dict):
            raise KvtoolError("merge settings must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - _INFO_KEYS
        if unknown:
            raise KvtoolError(f"merge settings: unknown key(s) {quoted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known}).validate()


def layer_keep(settings: CompressionSettings, kv_source_layers: list[int], layer_types: list[str] | None,
               k_source_layers: list[int] | None = None, v_source_layers: list[int] | None = None
               ) -> list[float | None]:
    """Per layer: the share of its prompt entries an owner keeps (None: not compressed). Counted in tensors, so a
    layer that owns only its keys or only its values weighs half; such a layer, and any layer whose keys and values
    are not read together, stays whole (its entries must line up with another layer's)."""
    L = len(kv_source_layers)
    k = list(k_source_layers if k_source_layers is not None else kv_source_layers)
    v = list(v_source_layers if v_source_layers is not None else kv_source_layers)
    prot = set(settings.protected_layers if settings.protected_layers is not None else protected_layers(L))
    types = layer_types or ["full_attention"] * L
    split = {k[j] for j in range(L) if k[j] != v[j]} | {v[j] for j in range(L) if k[j] != v[j]}
    # sliding-window layers keep their bounded window cache: the budget is over the full-attention layers' tensors
    full = [i for i in range(L) if types[i] != "sliding_attention"]
    owned = sum((k[i] == i) + (v[i] == i) for i in full)
    merged = [i for i in full if k[i] == i and v[i] == i and i not in prot and i not in split]
    keep: list[float | None] = [None] * L
    if settings.budget is None:  # threshold mode: every merged layer compresses, by similarity alone
        for i in merged:
            keep[i] = 1.0
        return keep
    if not merged:
        return keep
    share = (settings.budget * owned - (owned - 2 * len(merged))) / (2 * len(merged))
    if share < 0.05:
        raise KvtoolError(f"a budget of {settings.budget} cannot be met while layers {sorted(prot)} stay whole "
                          f"(only {len(merged)} of the full-attention layers that hold KV can be compressed)")
    for i in merged:
        keep[i] = min(1.0, max(share, 0.0))
    return keep
