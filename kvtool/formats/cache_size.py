"""The KV-cache size a sharing map (and a prompt-KV merge) implies, counted in stored entries per layer.

Pure arithmetic, no torch: every KV figure kvtool reports is checked against it. A layer stores one entry per token
it has seen, except that a consumer stores nothing, a sliding-window layer keeps at most ``window - 1`` entries
(transformers' ``DynamicSlidingWindowLayer``), and a merged owner keeps its ``merge_settings.layer_counts`` entries
of a ``T``-token prompt plus one per decoded token.
"""

from __future__ import annotations

import math

DEFAULT_CONTEXT = 4096  # tokens per sequence at which KV bytes are counted (matters only for sliding-window layers)


def stored_entries(kv_source_layers: list[int], layer_types: list[str] | None, sliding_window: int | None,
                   prompt: int, new: int = 0, kept: list[int | None] | None = None,
                   threshold_mode: bool = False) -> list[int | None]:
    """Entries each layer holds after a ``prompt``-token prefill and ``new`` one-token decode steps. ``kept``: per
    layer, the prompt entries a merged owner keeps (``merge_settings.layer_counts``; None: stays whole). In
    ``threshold_mode`` a merged layer's count depends on the data and is None."""
    L = len(kv_source_layers)
    types = layer_types or ["full_attention"] * L
    out: list[int | None] = []
    for i, s in enumerate(kv_source_layers):
        if s != i:
            out.append(0)
        elif types[i] == "sliding_attention" and sliding_window:
            out.append(min(prompt + new, sliding_window - 1))
        elif kept is None or kept[i] is None or prompt < 2:
            out.append(prompt + new)
        elif threshold_mode:
            out.append(None)
        else:
            out.append(min(kept[i], prompt) + new)
    return out


def kv_units(k_source_layers: list[int], v_source_layers: list[int], layer_types: list[str] | None,
             sliding_window: int | None, prompt: int, new: int = 0, kept: list[int | None] | None = None,
             threshold_mode: bool = False) -> list[int | None]:
    """Per layer, its stored key entries plus its stored value entries (a layer that owns only one of the two
    counts it alone): the cache's bytes in units of one token's keys (or values) of every KV head."""
    ek = stored_entries(k_source_layers, layer_types, sliding_window, prompt, new, kept, threshold_mode)
    ev = stored_entries(v_source_layers, layer_types, sliding_window, prompt, new, kept, threshold_mode)
    return [None if a is None or b is None else a + b for a, b in zip(ek, ev, strict=True)]


def tensor_units(layer_types: list[str], sliding_window: int | None, context: int) -> list[int]:
    """Per layer, the entries one of its tensors (its keys, or its values) holds for a ``context``-token sequence:
    what giving that tensor up saves, in units of one token's keys (or values) of every KV head."""
    L = len(layer_types)
    return [int(e or 0) for e in stored_entries(list(range(L)), layer_types, sliding_window, context)]


def removed_units(k_sources: list[int] | tuple[int, ...], v_sources: list[int] | tuple[int, ...],
                  units: list[int] | tuple[int, ...]) -> int:
    """The units a map gives up: each layer's keys and values that it reads from another layer."""
    return sum(u for j, u in enumerate(units) if k_sources[j] != j) + \
        sum(u for j, u in enumerate(units) if v_sources[j] != j)


def removed_share(k_sources: list[int] | tuple[int, ...], v_sources: list[int] | tuple[int, ...],
                  units: list[int] | tuple[int, ...]) -> float:
    """The share of the unshared model's KV-cache bytes a map removes (``units`` from ``tensor_units``): the one
    formula behind every removed or kept KV figure kvtool reports, and what ``--target`` asks for."""
    return removed_units(k_sources, v_sources, units) / (2 * sum(units))


def units_to_remove(units: list[int], target: float) -> int:
    """The fewest units that remove at least ``target`` of the ``2 × sum(units)`` a model's cache holds."""
    total = 2 * sum(units)
    return max(0, math.ceil(target * total - 1e-9 * total))


def kv_page_bytes(block_size: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of one layer's keys and values for one block of ``block_size`` tokens (a paged engine's page)."""
    return 2 * block_size * kv_heads * head_dim * elem_bytes


def engine_blocks(memory: int, page_bytes: int, layers_with_cache: int) -> int:
    """Blocks a paged engine (vLLM) allocates in ``memory`` bytes when every layer that holds a cache gets the same
    blocks: a consumer layer holds none, so fewer owners mean more blocks."""
    return memory // (page_bytes * layers_with_cache)
