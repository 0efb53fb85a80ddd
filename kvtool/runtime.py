"""The sharing runtime: consumer layers attend with their own queries over an earlier layer's keys/values.

Every attention module of a patched model runs ``_attention_forward``:
- an *owner* projects Q/K/V exactly as the original module does (bit-identical), updates its cache slot, and, if a
  later layer reads it, leaves the K/V it attends over in a per-model store;
- a *consumer* projects only its queries (RoPE on Q only), takes its source's K/V from that store, and applies its
  own mask, scaling and output projection. Its cache slot is a ``DummyLayer`` (via ``config.kv_sharing_modes``), so
  it stores nothing, and its K/V projections are never called.

The store is filled and emptied within one forward, so sharing holds with and without a cache.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvtool.archs import arch_of, decoder_layers, layer_types
from kvtool.errors import KvtoolError
from kvtool.plan import SharingPlan

Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class _SharedState:
    plan: SharingPlan
    last_reader: dict[int, int]  # source layer -> the last consumer that reads it (pops the entry)
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    observer: Observer | None = None
    had_modes: bool = False
    old_modes: object = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_q(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the queries alone (partial rotary when cos is narrower than the head)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return (q * cos) + (_rotate_half(q) * sin)
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    return torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)


def _project_qkv(attn: nn.Module, h: torch.Tensor, fused: bool, qk_norm: str | None):
    """Q, K, V as the original module computes them (same ops, same order), before RoPE."""
    hidden_shape = (*h.shape[:-1], -1, attn.head_dim)
    if fused:
        qkv = attn.qkv_proj(h)
        qpos = attn.config.num_attention_heads * attn.head_dim
        kvd = attn.num_key_value_heads * attn.head_dim
        q, k, v = qkv[..., :qpos], qkv[..., qpos : qpos + kvd], qkv[..., qpos + kvd :]
        return (q.view(hidden_shape).transpose(1, 2), k.view(hidden_shape).transpose(1, 2),
                v.view(hidden_shape).transpose(1, 2))
    if qk_norm == "pre":
        q = attn.q_norm(attn.q_proj(h).view(hidden_shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(hidden_shape)).transpose(1, 2)
        v = attn.v_proj(h).view(hidden_shape).transpose(1, 2)
        return q, k, v
    q = attn.q_proj(h).view(hidden_shape).transpose(1, 2)
    k = attn.k_proj(h).view(hidden_shape).transpose(1, 2)
    v = attn.v_proj(h).view(hidden_shape).transpose(1, 2)
    if qk_norm == "post":
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _project_q(attn: nn.Module, h: torch.Tensor, fused: bool, qk_norm: str | None) -> torch.Tensor:
    """Only the queries (a consumer never runs its K/V projections)."""
    hidden_shape = (*h.shape[:-1], -1, attn.head_dim)
    if fused:
        qpos = attn.config.num_attention_heads * attn.head_dim
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        q = nn.functional.linear(h, w[:qpos], None if b is None else b[:qpos])
        return q.view(hidden_shape).transpose(1, 2)
    if qk_norm == "pre":
        return attn.q_norm(attn.q_proj(h).view(hidden_shape)).transpose(1, 2)
    q = attn.q_proj(h).view(hidden_shape).transpose(1, 2)
    return attn.q_norm(q) if qk_norm == "post" else q


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    st: _SharedState = self._kvtool_state
    idx = self.layer_idx
    src = st.plan.kv_source_layers[idx]
    fused, qk_norm = self._kvtool_arch["fused"], self._kvtool_arch["qk_norm"]
    cos, sin = position_embeddings
    if src == idx:
        q, k, v = _project_qkv(self, hidden_states, fused, qk_norm)
        q, k = self._kvtool_rope(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, idx)
        if idx in st.last_reader:
            st.store[idx] = (k, v)
    else:
        q = rope_q(_project_q(self, hidden_states, fused, qk_norm), cos, sin)
        try:
            k, v = st.store.pop(src) if st.last_reader[src] == idx else st.store[src]
        except KeyError:
            raise RuntimeError(f"kvtool: layer {idx} reads layer {src}, which did not run first in this forward") \
                from None
    if st.observer is not None:
        st.observer(idx, q, k, v)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._kvtool_eager)
    extra = {"sliding_window": self.sliding_window if hasattr(self, "sliding_window")
             else getattr(self.config, "sliding_window", None)}
    if hasattr(self, "attn_logit_softcapping"):
        extra["softcap"] = self.attn_logit_softcapping
    out, weights = interface(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


def _state(model: nn.Module) -> _SharedState | None:
    return getattr(model, "_kvtool_state", None)


def _install(model: nn.Module, plan: SharingPlan) -> _SharedState:
    arch = arch_of(model)
    cfg = model.config
    plan.validate(cfg.num_hidden_layers, layer_types(cfg))
    last_reader: dict[int, int] = {}
    for j in plan.consumers:
        last_reader[plan.kv_source_layers[j]] = j
    st = _SharedState(plan=plan, last_reader=last_reader, had_modes=hasattr(cfg, "kv_sharing_modes"),
                      old_modes=getattr(cfg, "kv_sharing_modes", None))
    for layer in decoder_layers(model):
        attn = layer.self_attn
        mod = sys.modules[type(attn).__module__]
        attn._kvtool_state = st
        attn._kvtool_arch = arch
        attn._kvtool_rope = mod.apply_rotary_pos_emb
        attn._kvtool_eager = mod.eager_attention_forward
        attn.forward = _attention_forward.__get__(attn)
    cfg.kv_sharing_modes = ["store" if s == i else "reuse" for i, s in enumerate(plan.kv_source_layers)]
    model._kvtool_state = st
    model.kvtool_plan = plan
    return st


def remove_sharing(model: nn.Module) -> nn.Module:
    """Undo ``apply_sharing``: every layer computes and caches its own K/V again (needs the K/V weights)."""
    st = _state(model)
    if st is None:
        return model
    for layer in decoder_layers(model):
        attn = layer.self_attn
        for name in ("forward", "_kvtool_state", "_kvtool_arch", "_kvtool_rope", "_kvtool_eager"):
            attn.__dict__.pop(name, None)
    if st.had_modes:
        model.config.kv_sharing_modes = st.old_modes
    elif hasattr(model.config, "kv_sharing_modes"):
        delattr(model.config, "kv_sharing_modes")
    del model._kvtool_state
    model.__dict__.pop("kvtool_plan", None)
    return model


def apply_sharing(model: nn.Module, plan: SharingPlan, *, drop_unused: bool = False) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it. ``drop_unused`` frees the consumers' K/V weights."""
    if _state(model) is not None:
        remove_sharing(model)
    _install(model, plan)
    if drop_unused:
        drop_kv_weights(model, plan)
    return model


@contextlib.contextmanager
def sharing(model: nn.Module, plan: SharingPlan) -> Iterator[nn.Module]:
    """Apply ``plan`` for the duration of the block; the model's previous state is restored on exit."""
    prev = _state(model)
    apply_sharing(model, plan)
    try:
        yield model
    finally:
        remove_sharing(model)
        if prev is not None:
            _install(model, prev.plan)


@contextlib.contextmanager
def observe(model: nn.Module, observer: Observer) -> Iterator[nn.Module]:
    """Call ``observer(layer, q, k, v)`` in every attention layer (q after RoPE; k/v as attended over)."""
    prev = _state(model)
    if prev is None:
        _install(model, SharingPlan.identity(model.config.num_hidden_layers))
    st = _state(model)
    st.observer = observer
    try:
        yield model
    finally:
        st.observer = None
        if prev is None:
            remove_sharing(model)


def drop_kv_weights(model: nn.Module, plan: SharingPlan) -> None:
    """Delete the K/V projections (and k-norm) of consumer layers; for a fused qkv_proj keep only the Q rows."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    for j in plan.consumers:
        attn = layers[j].self_attn
        if arch["fused"]:
            qpos = attn.config.num_attention_heads * attn.head_dim
            old = attn.qkv_proj
            if old.weight.shape[0] == qpos:
                continue
            new = nn.Linear(old.in_features, qpos, bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight[:qpos])
                if old.bias is not None:
                    new.bias.copy_(old.bias[:qpos])
            attn.qkv_proj = new
        else:
            for name in ("k_proj", "v_proj", "k_norm"):
                if isinstance(getattr(attn, name, None), nn.Module):
                    setattr(attn, name, None)


def active_plan(model: nn.Module) -> SharingPlan | None:
    st = _state(model)
    return None if st is None else st.plan


def check_plan_for(model: nn.Module, plan: SharingPlan) -> None:
    """Raise ``KvtoolError`` if ``plan`` cannot apply to ``model``."""
    arch_of(model)
    plan.validate(model.config.num_hidden_layers, layer_types(model.config))
    if plan.model_fingerprint and getattr(model, "kvtool_fingerprint", None) not in (None, plan.model_fingerprint):
        raise KvtoolError("plan was made for a different model (fingerprint mismatch)")
