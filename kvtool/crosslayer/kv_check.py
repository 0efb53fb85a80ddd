"""Measure the KV cache a model really holds, and check it is the one its sharing map (and merging) implies.

Every KV figure kvtool reports goes through ``prefill_kv_bytes`` (or is compared with ``cache_size``'s count):
each layer's stored bytes must equal what the model's active map and merge method imply, or the measurement
is refused. A runtime that silently stopped sharing (or stopped caching) fails here with one line instead of
producing a report that looks fine.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.archs import kv_dims, layer_types
from kvtool.crosslayer.runtime import sharing_state
from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import kv_units
from kvtool.formats.merge_settings import MergeBase, layer_counts
from kvtool.formats.plan import SharingPlan


def layer_bytes(cache) -> list[int]:
    """Bytes held by each layer's key and value tensors (a ``DummyLayer`` holds none)."""
    return [sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor)) for layer in cache.layers]


def kv_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a cache."""
    return sum(layer_bytes(cache))


def expected_units(model: nn.Module, prompt: int, new: int = 0) -> list[int | None]:
    """Per layer, the key entries plus value entries that the model's active sharing map and merging imply
    (``cache_size.kv_units``; the unshared model when none is active)."""
    cfg = model.config
    st = sharing_state(model)
    L = cfg.num_hidden_layers
    k, v = (st.k_sources, st.v_sources) if st is not None else (list(range(L)), list(range(L)))
    merge = getattr(st.merge_hook, "method", None) if st is not None else None
    types = layer_types(cfg)
    kept = None if merge is None else layer_counts(merge, st.kv_source_layers, types, prompt, k, v)
    return kv_units(k, v, types, getattr(cfg, "sliding_window", None), prompt, new, kept,
                    threshold_mode=merge is not None and merge.budget is None)


def base_units(model: nn.Module, prompt: int, new: int = 0) -> list[int]:
    """Per layer, the key plus value entries of the unshared, uncompressed model."""
    cfg = model.config
    L = cfg.num_hidden_layers
    return kv_units(list(range(L)), list(range(L)), layer_types(cfg), getattr(cfg, "sliding_window", None), prompt,
                    new)


def unit_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of one token's keys (or values) over every KV head, for ``batch`` sequences."""
    heads, head_dim = kv_dims(model.config)
    return heads * head_dim * torch.empty((), dtype=next(model.parameters()).dtype).element_size() * batch


def entry_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of one stored entry (K and V of every KV head) for ``batch`` sequences."""
    return 2 * unit_bytes(model, batch)


def implied_bytes(model: nn.Module, plan: SharingPlan | None, merge: MergeBase | None, batch: int,
                  prompt: int, new: int = 0) -> int | None:
    """KV bytes a map (None: the unshared model) and a merge method imply for ``batch`` sequences of ``prompt``
    tokens plus ``new`` decoded ones (None when a method runs without a budget: data-dependent)."""
    cfg = model.config
    types = layer_types(cfg)
    plan = plan or SharingPlan.identity(cfg.num_hidden_layers)
    kept = None if merge is None else layer_counts(merge, plan.kv_source_layers, types, prompt, plan.k_source_layers,
                                                   plan.v_source_layers)
    units = kv_units(plan.k_sources, plan.v_sources, types, getattr(cfg, "sliding_window", None), prompt, new, kept,
                     threshold_mode=merge is not None and merge.budget is None)
    return None if None in units else sum(units) * unit_bytes(model, batch)


def check_layer_bytes(model: nn.Module, got: list[int], prompt: int, new: int = 0, batch: int = 1) -> None:
    """Raise ``KvtoolError`` unless each layer holds exactly the bytes the active map and merging imply."""
    L = model.config.num_hidden_layers
    got = list(got) + [0] * (L - len(got))
    per = unit_bytes(model, batch)
    want = expected_units(model, prompt, new)
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True))
           if (g != w * per if w is not None else not 0 < g <= 2 * (prompt + new) * per)]
    if not bad:
        return
    base = sum(base_units(model, prompt, new)) * per
    if None in want:
        says = f"at most {sum(2 * (prompt + new) * per if w is None else w * per for w in want) / base:.2f}"
    else:
        says = f"{sum(want) * per / base:.2f}"
    i, g, w = bad[0]
    detail = (f"layer {i} holds {g / (2 * per):g} entries, expected "
              f"{'up to ' + str(prompt + new) if w is None else format(w / 2, 'g')}")
    raise KvtoolError(f"sharing is not in effect: the model holds {sum(got) / base:.2f} of the base KV, the plan "
                      f"says {says} ({detail}; {len(bad)} of {L} layers differ)")


@torch.no_grad()
def prefill_kv_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """KV bytes a fresh ``DynamicCache`` holds after one prefill of ``ids``, checked layer by layer against what the
    model's sharing map and merging imply."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids.to(next(model.parameters()).device), use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    got = layer_bytes(cache)
    check_layer_bytes(model, got, ids.shape[1], batch=ids.shape[0])
    return sum(got)


def check_kv_in_effect(model: nn.Module, tokens: int = 64) -> float:
    """Prefill ``tokens`` tokens and check every layer's KV bytes (see ``check_layer_bytes``); returns the measured
    share of the base model's KV bytes."""
    ids = (torch.arange(tokens) * 7919 % max(1, model.config.vocab_size - 3) + 3)[None]
    return prefill_kv_bytes(model, ids) / (sum(base_units(model, tokens)) * unit_bytes(model))
