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
