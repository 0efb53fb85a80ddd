"""The sharing runtime API: apply a ``SharingPlan`` to a model, temporarily or for good, and observe attention.

The attention forward itself lives in ``kvtool.crosslayer.attention`` (self-contained, shipped with exports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kvtool.crosslayer.archs import arch_of, decoder_layers, layer_types
from kvtool.crosslayer.attention import (
    SharingRuntimeError,
    SharingState,
    drop_kv_modules,
    install,
    rope_q,
    uninstall,
)
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan

Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
__all__ = ["active_plan", "apply_sharing", "observe", "preloaded", "remove_sharing", "rope_q", "sharing",
           "sharing_state"]


def sharing_state(model: nn.Module) -> SharingState | None:
    """The sharing runtime installed on ``model`` (its map, store and hooks), or None."""
    return getattr(model, "_kvtool_state", None)


def _install(model: nn.Module, plan: SharingPlan) -> SharingState:
    arch_of(model)
    decoder_layers(model)
    plan.validate(model.config.num_hidden_layers, layer_types(model.config))
    try:
        st = install(model, plan.kv_source_layers, plan.k_source_layers, plan.v_source_layers)
    except SharingRuntimeError as e:
        raise KvtoolError(str(e)) from None
    st.plan = plan
    return st


def remove_sharing(model: nn.Module) -> nn.Module:
    """Undo ``apply_sharing``: every layer computes and caches its own K/V again (needs the K/V weights)."""
    uninstall(model)
    return model


def apply_sharing(model: nn.Module, plan: SharingPlan, *, drop_unused: bool = False) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it. ``drop_unused`` frees the consumers' K/V weights."""
    if sharing_state(model) is not None:
        remove_sharing(model)
    _install(model, plan)
    if drop_unused:
        drop_kv_modules(model, plan.kv_source_layers, plan.k_source_layers, plan.v_source_layers)
    return model


@contextlib.contextmanager
def sharing(model: nn.Module, plan: SharingPlan) -> Iterator[nn.Module]:
    """Apply ``plan`` for the duration of the block; the model's previous state is restored on exit."""
    prev = active_plan(model)
    apply_sharing(model, plan)
    try:
        yield model
    finally:
        remove_sharing(model)
        if prev is not None:
            _install(model, prev)


@contextlib.contextmanager
def observe(model: nn.Module, observer: Observer) -> Iterator[nn.Module]:
    """Call ``observer(layer, q, k, v)`` in every attention layer (q after RoPE; k/v as attended over)."""
    prev = sharing_state(model)
    if prev is None:
        _install(model, SharingPlan.identity(model.config.num_hidden_layers))
    st = sharing_state(model)
    st.observer = observer
    try:
        yield model
    finally:
        st.observer = None
        if prev is None:
            remove_sharing(model)


@contextlib.contextmanager
def preloaded(model: nn.Module, kv: dict[tuple[str, int], torch.Tensor], observer: Observer) -> Iterator[nn.Module]:
    """Run layers one by one with ``kv`` (``("k" | "v", owner layer)`` -> its keys or values) already in the
    runtime's store, as if those owners had run, and ``observer`` called in every layer that runs; both are cleared
    on exit. For scoring a map from a stored layer onward (``search.scoring``); needs the runtime installed."""
    st = sharing_state(model)
    if st is None:
        raise KvtoolError("preloaded(): apply a sharing plan first")
    st.store.update(kv)
    st.observer = observer
    try:
        yield model
    finally:
        st.observer = None
        st.store.clear()


def active_plan(model: nn.Module) -> SharingPlan | None:
    """The plan the model runs under, or None."""
    st = sharing_state(model)
    return None if st is None else st.plan
