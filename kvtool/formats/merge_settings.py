"""What every prompt-KV merge method shares, and how many prompt entries each layer keeps. Pure data: the methods
themselves (one dataclass per file, each holding only its own settings) are ``kvtool.merging.methods``.

``budget`` is the kept share of the prompt KV the model stores in its full-attention owner layers. Consumers store
nothing and sliding-window layers keep their bounded window, so neither counts; the protected layers stay whole, and
the other owners ("merged layers") keep the rest of the budget between them. ``layer_budgets`` (calibrated by
``search --merge-budget``, one share per layer, None where a layer is not merged) says how unevenly: without it every
merged layer keeps the same share. ``layer_counts`` is the one formula for how many entries each layer keeps of a
``T``-token prompt, used to merge, to check the cache's bytes and to report: the merged layers' counts add up to the
budget's entries, rounded once for the whole model, not once per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvtool.errors import KvtoolError

MIN_SHARE = 0.05  # the least share of its prompt a merged layer keeps


def protected_layers(num_layers: int) -> list[int]:
    """KVMerger's default: the first two layers and the last one stay whole."""
    return sorted({0, 1, num_layers - 1} & set(range(num_layers)))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class MergeBase:
    """The settings every method has. ``protected_layers=None``: the first two and the last layer."""

    budget: float | None = 0.5  # kept share of the prompt KV; None: a method's own criterion alone (KVMerger's eps)
    protected_layers: list[int] | None = None
    layer_budgets: list[float | None] | None = None  # per layer, its kept share (calibrated); None: all alike

    def check_shared(self) -> None:
        """One-line errors for the shared fields (each method checks its own)."""
        if self.budget is not None and (not _number(self.budget) or not 0 < self.budget <= 1):
            raise KvtoolError(f"merge budget must be in (0, 1], got {self.budget!r}")
        if self.protected_layers is not None and (
                not isinstance(self.protected_layers, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.protected_layers)):
            raise KvtoolError("merge settings: protected_layers must be a list of layer indices")
        if self.layer_budgets is not None:
            if self.budget is None:
                raise KvtoolError("merge settings: layer_budgets need a budget")
            if not isinstance(self.layer_budgets, list) or not all(
                    s is None or (_number(s) and MIN_SHARE - 1e-9 <= s <= 1) for s in self.layer_budgets):
                raise KvtoolError(f"merge settings: layer_budgets must be a list of shares in [{MIN_SHARE}, 1] or "
                                  "null")


def merged_layers(settings: MergeBase, kv_source_layers: list[int], layer_types: list[str] | None,
                  k_source_layers: list[int] | None = None, v_source_layers: list[int] | None = None
                  ) -> tuple[list[int], int]:
    """(the layers a method merges, the full-attention tensors the model stores). A merged layer owns its keys and
    values, is full attention and not protected; a layer whose keys and values are read apart stays whole (its
    entries must line up with another layer's). Tensors: a layer that owns only its keys or its values counts one."""
    L = len(kv_source_layers)
    k = list(k_source_layers if k_source_layers is not None else kv_source_layers)
    v = list(v_source_layers if v_source_layers is not None else kv_source_layers)
    prot = set(settings.protected_layers if settings.protected_layers is not None else protected_layers(L))
    types = layer_types or ["full_attention"] * L
    split = {k[j] for j in range(L) if k[j] != v[j]} | {v[j] for j in range(L) if k[j] != v[j]}
    full = [i for i in range(L) if types[i] != "sliding_attention"]
    owned = sum((k[i] == i) + (v[i] == i) for i in full)
    return [i for i in full if k[i] == i and v[i] == i and i not in prot and i not in split], owned


def layer_shares(settings: MergeBase, kv_source_layers: list[int], layer_types: list[str] | None,
                 k_source_layers: list[int] | None = None, v_source_layers: list[int] | None = None
                 ) -> list[float | None]:
    """Per layer, the share of its prompt a merged layer keeps (None: stays whole); 1.0 for every merged layer when
    there is no budget (a method's own criterion decides, data-dependent)."""
    return _shares(settings, kv_source_layers, layer_types, k_source_layers, v_source_layers)[0]


def _shares(settings: MergeBase, kv_source_layers: list[int], layer_types: list[str] | None,
            k_source_layers: list[int] | None, v_source_layers: list[int] | None) -> tuple[list[float | None], int]:
    """``layer_shares`` and the full-attention tensors the model stores."""
    L = len(kv_source_layers)
    merged, owned = merged_layers(settings, kv_source_layers, layer_types, k_source_layers, v_source_layers)
    shares: list[float | None] = [None] * L
    if settings.budget is None:
        for i in merged:
            shares[i] = 1.0
        return shares, owned
    if not merged:
        return shares, owned
    even = (settings.budget * owned - (owned - 2 * len(merged))) / (2 * len(merged))
    if even < MIN_SHARE:
        prot = settings.protected_layers if settings.protected_layers is not None else protected_layers(L)
        raise KvtoolError(f"a budget of {settings.budget} cannot be met while layers {sorted(prot)} stay whole "
                          f"(only {len(merged)} of the full-attention layers that hold KV can be merged)")
    lb = settings.layer_budgets
    if lb is None:
        for i in merged:
            shares[i] = min(1.0, even)
        return shares, owned
    if len(lb) != L or sorted(i for i in range(L) if lb[i] is not None) != merged:
        raise KvtoolError("the merge's layer budgets were calibrated for another map or other protected layers; "
                          "rerun `kvtool search --merge-budget` for this one")
    for i in merged:
        shares[i] = float(lb[i])
    return shares, owned


def layer_counts(settings: MergeBase, kv_source_layers: list[int], layer_types: list[str] | None, prompt: int,
                 k_source_layers: list[int] | None = None, v_source_layers: list[int] | None = None
                 ) -> list[int | None]:
    """Per layer, the entries a merged layer keeps of a ``prompt``-token prefill (None: stays whole). The merged
    layers keep ``round((budget · stored - whole) / 2)`` entries between them, split by their shares with the
    largest remainders. Without a budget a merged layer's count depends on the data: ``prompt``, the most it keeps.
    """
    shares, owned = _shares(settings, kv_source_layers, layer_types, k_source_layers, v_source_layers)
    merged = [i for i, s in enumerate(shares) if s is not None]
    counts: list[int | None] = [None] * len(shares)
    if settings.budget is None:
        return [None if s is None else prompt for s in shares]
    if not merged or prompt < 2:
        return counts
    whole = (owned - 2 * len(merged)) * prompt
    total = max(len(merged), min(len(merged) * prompt, round((settings.budget * owned * prompt - whole) / 2)))
    weight = sum(shares[i] for i in merged)
    want = {i: shares[i] / weight * total for i in merged}
    got = {i: max(1, min(prompt, math.floor(want[i]))) for i in merged}
    left = total - sum(got.values())
    order = sorted(merged, key=lambda i: (-(want[i] - math.floor(want[i])), i))
    while left != 0:  # hand out (or take back) one entry at a time, largest remainder first, within [1, prompt]
        moved = False
        for i in order if left > 0 else order[::-1]:
            if left > 0 and got[i] < prompt:
                got[i], left, moved = got[i] + 1, left - 1, True
            elif left < 0 and got[i] > 1:
                got[i], left, moved = got[i] - 1, left + 1, True
            if left == 0:
                break
        if not moved:
            break
    for i in merged:
        counts[i] = got[i]
    return counts


def check_merge_dict(d: Any, num_layers: int | None = None) -> dict[str, Any]:
    """The structural check a plan applies to its ``merge`` object (the method's own fields are checked where the
    methods live, when it is used)."""
    if not isinstance(d, dict):
        raise KvtoolError("merge settings must be a JSON object")
    if not isinstance(d.get("method", "kvmerger"), str):
        raise KvtoolError("merge settings: method must be a name")
    shared = MergeBase(budget=d.get("budget", 0.5), protected_layers=d.get("protected_layers"),
                       layer_budgets=d.get("layer_budgets"))
    shared.check_shared()
    if num_layers is not None and shared.layer_budgets is not None and len(shared.layer_budgets) != num_layers:
        raise KvtoolError(f"merge settings: layer_budgets cover {len(shared.layer_budgets)} layers, the map "
                          f"{num_layers}")
    return d
