"""Prompt KV compression at prefill, composable with layer sharing: KVMerger merging, attnmerge (keep by the last
queries' attention, merge the rest into their most similar kept token), or the H2O / StreamingLLM eviction baselines
in the same harness and at the same budget.

It runs inside the sharing runtime's attention forward (``kvtool.crosslayer.attention``): an owner layer attends over
its full prompt KV as usual, then computes the accumulated attention of its own queries, compresses its cache slot
(a ``CompressedLayer``) to ``floor(layer_keep × T)`` entries per KV head, and decoding appends to it. A consumer
layer reads its source's compressed cache. Not compressed: the protected layers (KVMerger: the first two and the
last), sliding-window layers (their cache is already bounded), forwards without a cache, and any forward after the
first (only the prompt is compressed). ``budget`` is the kept share of the prompt KV the model stores in its
full-attention owner layers: unprotected owners get a tighter per-layer share so that the total meets it, and
every KV head of a layer keeps the same count, so the cache stays dense and the memory saving is real. The settings
and the per-layer share are data (``kvtool.formats.merge_settings``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.runtime import apply_sharing, remove_sharing, sharing_state
from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import CompressionSettings, layer_keep
from kvtool.formats.plan import SharingPlan
from kvtool.merging.attnmerge import attn_merge_rows, window_attention
from kvtool.merging.compressed_cache import CompressedLayer
from kvtool.merging.eviction import gather_rows, h2o_keep, streaming_keep
from kvtool.merging.kvmerger import merge_rows


def _allowed(mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    """[B, 1|H, T, T] bool: which prompt key each prompt query may attend to."""
    if mask is None:
        return torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    m = mask[..., :T]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(B, *m.shape[1:])


def _unit(score: torch.Tensor) -> torch.Tensor:
    """Each row of ``score`` [R, T] scaled to sum to 1."""
    return score / score.sum(-1, keepdim=True).clamp_min(1e-12)


class Compressor:
    """The hook the sharing runtime calls in each attention forward (see ``crosslayer.attention.attention_forward``)."""

    def __init__(self, settings: CompressionSettings, keep: list[float | None]) -> None:
        self.settings = settings
        self.keep = keep
        self.last: dict[int, dict[str, Any]] = {}  # per layer: what the last compression did (for reports)
        self.caches: weakref.WeakSet = weakref.WeakSet()  # caches this compressor compressed that are still alive

    def prepare(self, cache: Any, idx: int) -> None:
        """Before an owner's cache update: give a compressed layer a ``CompressedLayer`` slot."""
        if self.keep[idx] is None:
            return
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise KvtoolError("KV compression needs a DynamicCache")
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(layers) <= idx:
                layers.append(cache.layer_class_to_replicate())
        layer = layers[idx]
        if isinstance(layer, CompressedLayer):
            return
        if type(layer) is not DynamicLayer:
            raise KvtoolError(f"KV compression needs a DynamicCache, got a {type(layer).__name__} layer")
        if layer.is_initialized and layer.get_seq_length() > 0:
            return  # a cache filled before compression was turned on: left as is
        layers[idx] = CompressedLayer()

    def after(self, module: nn.Module, idx: int, q: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> None:
        """After an owner's attention: compress its prompt if this forward was the prefill."""
        frac = self.keep[idx]
        layer = cache.layers[idx] if idx < len(getattr(cache, "layers", [])) else None
        if frac is None or not isinstance(layer, CompressedLayer) or layer.compressed:
            return
        B, Hkv, T, D = layer.keys.shape
        if q.shape[-2] != T or T < 2:
            return
        s = self.settings
        n = max(1, math.floor(frac * T)) if s.budget is not None else None
        if n is not None and n >= T:
            return
        allowed = _allowed(mask, B, T)
        pad = (~allowed[:, 0, -1, :]).repeat_interleave(Hkv, dim=0)  # [B*Hkv, T]: padding (left) positions
        keys, values = layer.keys.reshape(B * Hkv, T, D), layer.values.reshape(B * Hkv, T, D)
        acc = None
        if s.method in ("kvmerger", "h2o"):
            acc = window_attention(q, layer.keys, allowed, module.scaling, 0).reshape(B * Hkv, T)  # H2O's score
        thr = sizes = None
        if s.method == "kvmerger":
            eps: Any = s.eps
            if s.thresholds is not None and s.thresholds[idx] is not None:
                eps = torch.tensor(s.thresholds[idx]).repeat(B)
            cap = n if n is not None else T
            r = merge_rows(keys, values, acc, n, pad=pad, eps=eps, sigma=s.sigma, sinks=s.sinks,
                           recent=min(s.recent, cap // 4), heavy=int(s.heavy * cap))
            k2, v2, pos, thr = r.keys, r.values, r.positions, r.threshold
            if s.size_bias:
                sizes = r.sizes
        elif s.method == "attnmerge":
            score = window_attention(q, layer.keys, allowed, module.scaling, s.window).reshape(B * Hkv, T)
            if s.mix > 0:
                acc = window_attention(q, layer.keys, allowed, module.scaling, 0).reshape(B * Hkv, T)  # H2O's score
                score = _unit(score) + s.mix * _unit(acc)
            recent = max(min(s.recent, n // 4), math.floor(s.recent_share * n))
            a = attn_merge_rows(keys, values, score, n, pad=pad, sinks=s.sinks, recent=recent,
                                pool=s.pool, min_similarity=s.min_similarity, merge_keys=s.merge_keys)
            k2, v2, pos = a.keys, a.values, a.positions
            if s.size_bias:
                sizes = a.sizes
        else:
            pos = h2o_keep(acc, pad, n) if s.method == "h2o" else streaming_keep(pad, n, s.sinks)
            k2, v2 = gather_rows(keys, pos), gather_rows(values, pos)
        n2 = k2.shape[1]
        pad_entries = pad.gather(1, pos).sum(1).view(B, Hkv)
        layer.compress(k2.view(B, Hkv, n2, D), v2.view(B, Hkv, n2, D), pad_entries[:, 0],
                       None if sizes is None else sizes.view(B, Hkv, n2))
        self.caches.add(cache)
        real = None if thr is None else thr[(thr >= -1) & (thr <= 1)]  # pairs of real, unprotected tokens
        self.last[idx] = {"prompt": T, "kept": n2,
                          "threshold": float(real.mean()) if real is not None and real.numel() else None}


def apply_compression(model: nn.Module, settings: CompressionSettings | None = None, **kw: Any) -> nn.Module:
    """Turn on prompt KV compression (``settings`` or keyword fields of ``CompressionSettings``) for ``model``,
    sharing or not; returns the model. Needs sdpa or eager attention."""
    settings = (settings or CompressionSettings(**kw)).validate()
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise KvtoolError(f"KV compression needs sdpa or eager attention, not {impl}")
    if sharing_state(model) is None:
        apply_sharing(model, SharingPlan.identity(model.config.num_hidden_layers))
    st = sharing_state(model)
    if settings.thresholds is not None and len(settings.thresholds) != len(st.kv_source_layers):
        raise KvtoolError(f"merge thresholds cover {len(settings.thresholds)} layers; the model has "
                          f"{len(st.kv_source_layers)}")
    st.compressor = Compressor(settings, layer_keep(settings, st.kv_source_layers, layer_types(model.config),
                                                    st.k_sources, st.v_sources))
    return model


def remove_compression(model: nn.Module) -> nn.Module:
    st = sharing_state(model)
    if st is not None:
        st.compressor = None
    return model


def active_compression(model: nn.Module) -> CompressionSettings | None:
    """The prompt-compression settings the model runs with, or None."""
    st = sharing_state(model)
    return None if st is None or st.compressor is None else st.compressor.settings


# model -> (the identity sharing state a ``compression`` block added, the compressors whose caches are still alive)
_LINGERING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def compression(model: nn.Module, settings: CompressionSettings | None = None, **kw: Any) -> Iterator[nn.Module]:
    """Compression for the duration of the block (the sharing state, if any, is kept). A cache compressed inside
    the block stays decodable after it: the identity runtime added for the block (bit-identical to the original
    forward) is removed on exit unless such a cache is still alive, in which case it stays until a later block ends
    with none alive, or ``kvtool.remove_sharing(model)``."""
    state, lingering = _LINGERING.pop(model, (None, []))
    if state is not sharing_state(model):
        lingering = []
    had_state = sharing_state(model) is not None and not lingering
    prev = active_compression(model)
    apply_compression(model, settings, **kw)
    compressor = sharing_state(model).compressor
    try:
        yield model
    finally:
        remove_compression(model)
        if not had_state:
            alive = [c for c in (*lingering, compressor) if len(c.caches)]
            if alive:
                _LINGERING[model] = (sharing_state(model), alive)
            else:
                remove_sharing(model)
        elif prev is not None:
            apply_compression(model, prev)
