"""Prompt-KV merging at prefill, composable with layer sharing: the hook, and turning it on and off.

The hook runs inside the sharing runtime's attention forward (``kvtool.crosslayer.attention``): an owner layer
attends over its full prompt KV as usual, then its cache slot (a ``CompressedLayer``) is reduced by the method to
the layer's count (``formats.merge_settings.layer_counts``, the same formula the cache check and the reports use),
and decoding appends to it. Every KV head of a layer keeps the same count, so the cache stays dense and the memory
saving is real. A consumer layer reads its source's merged cache. Not merged: the protected layers, sliding-window
layers (their cache is already bounded), forwards without a cache, and any forward after the first (only the prompt
is merged). The hook knows no method by name: it hands the method a ``PromptKV`` and writes back what it keeps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.runtime import apply_sharing, remove_sharing, sharing_state
from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import layer_counts, layer_shares
from kvtool.formats.plan import SharingPlan
from kvtool.merging.compressed_cache import CompressedLayer
from kvtool.merging.methods import MergeMethod, PromptKV, as_method, make_method


def _allowed(mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """[B, 1|H, T, T] bool: which prompt key each prompt query may attend to."""
    if mask is None:
        return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None].expand(B, 1, T, T)
    m = mask[..., :T]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(B, *m.shape[1:])


class MergeHook:
    """What the sharing runtime calls in each attention forward (see ``crosslayer.attention.attention_forward``)."""

    def __init__(self, method: MergeMethod, kv_source_layers: list[int], types: list[str] | None,
                 k_sources: list[int], v_sources: list[int]) -> None:
        self.method = method
        self._map = (kv_source_layers, types, k_sources, v_sources)
        self._counts: dict[int, list[int | None]] = {}
        self.merged = [s is not None for s in layer_shares(method, kv_source_layers, types, k_sources, v_sources)]
        self.caches: weakref.WeakSet = weakref.WeakSet()  # caches this hook merged that are still alive

    def counts(self, prompt: int) -> list[int | None]:
        """Per layer, the entries it keeps of a ``prompt``-token prefill (``merge_settings.layer_counts``)."""
        if prompt not in self._counts:
            kv, types, k, v = self._map
            self._counts[prompt] = layer_counts(self.method, kv, types, prompt, k, v)
        return self._counts[prompt]

    def prepare(self, cache: Any, idx: int) -> None:
        """Before an owner's cache update: give a merged layer a ``CompressedLayer`` slot."""
        if not self.merged[idx]:
            return
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise KvtoolError("KV merging needs a DynamicCache")
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(layers) <= idx:
                layers.append(cache.layer_class_to_replicate())
        layer = layers[idx]
        if isinstance(layer, CompressedLayer):
            return
        if type(layer) is not DynamicLayer:
            raise KvtoolError(f"KV merging needs a DynamicCache, got a {type(layer).__name__} layer")
        if layer.is_initialized and layer.get_seq_length() > 0:
            return  # a cache filled before merging was turned on: left as is
        layers[idx] = CompressedLayer()

    def after(self, module: nn.Module, idx: int, q: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> None:
        """After an owner's attention: merge its prompt if this forward was the prefill."""
        layer = cache.layers[idx] if idx < len(getattr(cache, "layers", [])) else None
        if not self.merged[idx] or not isinstance(layer, CompressedLayer) or layer.compressed:
            return
        B, Hkv, T, D = layer.keys.shape
        if q.shape[-2] != T or T < 2:
            return
        n = self.counts(T)[idx] if self.method.budget is not None else None
        if n is not None and n >= T:
            return
        allowed = _allowed(mask, B, T, q.device)
        pad = (~allowed[:, 0, -1, :]).repeat_interleave(Hkv, dim=0)  # [B*Hkv, T]: padding (left) positions
        kv = PromptKV(layer.keys.reshape(B * Hkv, T, D), layer.values.reshape(B * Hkv, T, D), pad, q, allowed,
                      module.scaling)
        kept = self.method.reduce(kv, n)
        n2 = kept.keys.shape[1]
        if n is not None and n2 != n:
            raise KvtoolError(f"merge method {self.method.name} kept {n2} entries of layer {idx}, not {n}")
        pad_entries = pad.gather(1, kept.positions).sum(1).view(B, Hkv)
        layer.compress(kept.keys.view(B, Hkv, n2, D), kept.values.view(B, Hkv, n2, D), pad_entries[:, 0],
                       None if kept.sizes is None else kept.sizes.view(B, Hkv, n2))
        self.caches.add(cache)


def apply_merge(model: nn.Module, settings: MergeMethod | dict | None = None, **fields: Any) -> nn.Module:
    """Turn on prompt-KV merging for ``model``, sharing or not: ``settings`` (a ``MergeMethod`` or its dict) or
    keyword fields (``method="h2o", budget=0.5``, ...). Returns the model. Needs sdpa or eager attention."""
    m = as_method(settings) if settings is not None else make_method(**fields)
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise KvtoolError(f"KV merging needs sdpa or eager attention, not {impl}")
    if sharing_state(model) is None:
        apply_sharing(model, SharingPlan.identity(model.config.num_hidden_layers))
    st = sharing_state(model)
    if m.layer_budgets is not None and len(m.layer_budgets) != len(st.kv_source_layers):
        raise KvtoolError(f"the merge's layer budgets cover {len(m.layer_budgets)} layers; the model has "
                          f"{len(st.kv_source_layers)}")
    st.merge_hook = MergeHook(m, st.kv_source_layers, layer_types(model.config), st.k_sources, st.v_sources)
    return model


def remove_merge(model: nn.Module) -> nn.Module:
    st = sharing_state(model)
    if st is not None:
        st.merge_hook = None
    return model


def active_merge(model: nn.Module) -> MergeMethod | None:
    """The merge method the model runs with, or None."""
    st = sharing_state(model)
    return None if st is None or st.merge_hook is None else st.merge_hook.method


# model -> (the identity sharing state a ``merge`` block added, the hooks whose caches are still alive)
_LINGERING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def merge(model: nn.Module, settings: MergeMethod | dict | None = None, **fields: Any) -> Iterator[nn.Module]:
    """Merging for the duration of the block (the sharing state, if any, is kept). A cache merged inside the block
    stays decodable after it: the identity runtime added for the block (bit-identical to the original forward) is
    removed on exit unless such a cache is still alive, in which case it stays until a later block ends with none
    alive, or ``kvtool.remove_sharing(model)``."""
    state, lingering = _LINGERING.pop(model, (None, []))
    if state is not sharing_state(model):
        lingering = []
    had_state = sharing_state(model) is not None and not lingering
    prev = active_merge(model)
    apply_merge(model, settings, **fields)
    hook = sharing_state(model).merge_hook
    try:
        yield model
    finally:
        remove_merge(model)
        if not had_state:
            alive = [c for c in (*lingering, hook) if len(c.caches)]
            if alive:
                _LINGERING[model] = (sharing_state(model), alive)
            else:
                remove_sharing(model)
        elif prev is not None:
            apply_merge(model, prev)
