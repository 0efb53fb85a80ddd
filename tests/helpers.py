"""Shared test helpers (the logic they wrap lives in the library, once)."""

from __future__ import annotations

import torch

from kvtool.crosslayer.archs import layer_types
from kvtool.formats.plan import SharingPlan


def plan_for(model, consumers=(2, 4, 5)) -> SharingPlan:
    """Each consumer reads the nearest earlier owner of its own attention type."""
    return SharingPlan.nearest_owner(layer_types(model.config), consumers)


def ids(b: int = 2, t: int = 20, seed: int = 0) -> torch.Tensor:
    """Random token ids of the tiny models' vocabulary (128), reproducibly."""
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def left_padded(t: int = 30, pad: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids(t=t)`` and an attention mask whose first row is left-padded by ``pad`` tokens."""
    x = ids(t=t)
    mask = torch.ones_like(x)
    mask[0, :pad] = 0
    return x, mask


# compress every layer: tiny models have 6 layers, and protecting 3 would leave no room for a budget
ALL_LAYERS = dict(protected_layers=[])


def tensor_plan_for(model, moves=((2, "k"), (3, "v"), (4, "k"), (4, "v"), (5, "k"))) -> SharingPlan:
    """A per-tensor plan: each (layer, "k"|"v") move reads that tensor from the nearest earlier layer of the same
    attention type that owns it (moves with no such layer are skipped)."""
    types = layer_types(model.config)
    src = {"k": list(range(len(types))), "v": list(range(len(types)))}
    for j, t in moves:
        for i in range(j - 1, -1, -1):
            if types[i] == types[j] and src[t][i] == i:
                src[t][j] = i
                break
    return SharingPlan.from_tensors(src["k"], src["v"], layer_types=list(types))


def json_values():
    """Hypothesis strategy: any JSON value, nested a few levels (for the format readers' property tests)."""
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=6)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=20)
