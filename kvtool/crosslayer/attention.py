"""Cross-layer KV sharing inside a transformers model: the attention forward every patched layer runs.

Self-contained (torch + transformers only): ``kvtool export`` copies this file beside the weights as
``kvtool_sharing.py``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs the same code
without kvtool installed.

- An *owner* projects Q/K/V exactly as the original module (bit-identical), updates its cache slot, and, if a later
  layer reads it, leaves the K/V it attends over in a per-model store.
- A *consumer* projects only its queries (RoPE on Q only), takes its source's K/V from the store, and applies its own
  mask, scaling and output projection. Its cache slot is a ``DummyLayer`` (``config.kv_sharing_modes``), so it
  stores nothing; its K/V projections are never called.
The store is filled and emptied within one forward, so sharing holds with and without a cache.
An optional ``compressor`` hook (set by ``kvtool.compression``; exports run without it) compresses an owner's
prompt KV after its prefill attention. A compressed cache layer carries its own entry map
(``kvtool_attention_mask``), which maps the attention mask over positions onto its stored entries, so a compressed
cache keeps decoding correctly after the compression hook is gone.
The runtime checks transformers' internals when it installs (``check_internals``) and refuses a cache handed over
under a keyword it does not know, so a renamed argument fails loudly instead of silently running without a cache.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The transformers releases this file was tested on (kvtool's pyproject.toml declares the same range).
TESTED_TRANSFORMERS = ">=5.23,<5.25"
# How an attention module may be handed its cache: "past_key_values" (<= 5.23), "cache" (5.24 on).
CACHE_KEYWORDS = ("cache", "past_key_values")


class SharingRuntimeError(RuntimeError):
    """The installed transformers is not what this runtime expects: refuse rather than run unshared or garbage."""

# model_type -> how its attention projects Q/K/V. "fused": one qkv_proj (Phi-3); "qk_norm": q_norm/k_norm modules,
# applied before ("pre") or after ("post") the head transpose.
ARCHS: dict[str, dict[str, object]] = {
    "llama": {"fused": False, "qk_norm": None},
    "mistral": {"fused": False, "qk_norm": None},
    "qwen2": {"fused": False, "qk_norm": None},
    "qwen3": {"fused": False, "qk_norm": "pre"},
    "gemma2": {"fused": False, "qk_norm": None},
    "gemma3_text": {"fused": False, "qk_norm": "post"},
    "phi3": {"fused": True, "qk_norm": None},
}


@dataclass
class SharingState:
    kv_source_layers: list[int]
    last_reader: dict[int, int]  # source layer -> the last consumer that reads it (and pops the entry)
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    observer: object = None  # optional callable(layer, q, k, v)
    compressor: object = None  # optional prompt-KV compression hook (kvtool.merging.compressor.Compressor)
    plan: object = None  # the plan this state was installed from (kvtool's SharingPlan), when there is one
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


def _unsupported(what: str) -> SharingRuntimeError:
    return SharingRuntimeError(f"kvtool's KV-sharing runtime cannot run on transformers {transformers.__version__}: "
                               f"{what} (tested on transformers{TESTED_TRANSFORMERS})")


def check_internals(model: nn.Module) -> None:
    """Check, before patching anything, that the transformers internals this runtime hooks into are the ones it was
    written against; raise ``SharingRuntimeError`` (one line) if not."""
    params = list(inspect.signature(Cache.update).parameters)
    if params[:4] != ["self", "key_states", "value_states", "layer_idx"]:
        raise _unsupported(f"Cache.update takes ({', '.join(params[1:])}), not (key_states, value_states, "
                           "layer_idx, ...)")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise _unsupported(f"{type(model).__name__} has no .model.layers")
    checked: set[type] = set()
    for layer in layers:
        for cls in (type(layer), type(layer.self_attn)):
            if cls in checked:
                continue
            checked.add(cls)
            sig = inspect.signature(cls.forward)  # follows the __wrapped__ of transformers' keyword shims
            if not any(name in sig.parameters for name in CACHE_KEYWORDS):
                raise _unsupported(f"{cls.__name__}.forward takes no cache argument kvtool knows "
                                   f"({' or '.join(CACHE_KEYWORDS)}); it takes ({', '.join(list(sig.parameters)[1:])})")
        attn = layer.self_attn
        mod = sys.modules[type(attn).__module__]
        for fn in ("apply_rotary_pos_emb", "eager_attention_forward"):
            if not callable(getattr(mod, fn, None)):
                raise _unsupported(f"{mod.__name__} defines no {fn}")
        for name in ("layer_idx", "scaling", "head_dim", "o_proj"):
            if not hasattr(attn, name):
                raise _unsupported(f"{type(attn).__name__} has no attribute {name!r}")
        if not (hasattr(attn, "q_proj") or hasattr(attn, "qkv_proj")):
            raise _unsupported(f"{type(attn).__name__} has neither q_proj nor qkv_proj")


def _cache_layer(cache, idx: int):
    layers = getattr(cache, "layers", None)
    return layers[idx] if layers is not None and idx < len(layers) else None


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      cache=None, **kwargs):
    """Replacement ``forward`` of an attention module under a sharing map (see the module docstring). The cache
    arrives as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier); neither is passed on to the kernel,
    and a cache under any other keyword is refused rather than ignored."""
    if cache is None:
        cache = past_key_values
    elif past_key_values is not None and past_key_values is not cache:
        raise SharingRuntimeError(f"layer {self.layer_idx} was given two different caches (cache and past_key_values)")
    for key, value in kwargs.items():
        if isinstance(value, Cache):
            raise _unsupported(f"layer {self.layer_idx}'s attention was handed its cache as {key!r}, a keyword this "
                               "runtime does not know")
    st: SharingState = self._kvtool_state
    idx = self.layer_idx
    src = st.kv_source_layers[idx]
    fused, qk_norm = self._kvtool_arch["fused"], self._kvtool_arch["qk_norm"]
    cos, sin = position_embeddings
    if src == idx:
        q, k, v = _project_qkv(self, hidden_states, fused, qk_norm)
        q, k = self._kvtool_rope(q, k, cos, sin)
        if cache is not None:
            if st.compressor is not None:
                st.compressor.prepare(cache, idx)
            # a kvtool compressed layer refuses updates from forwards that would not remap its mask
            marker = {"kvtool_runtime": True} if hasattr(_cache_layer(cache, idx), "kvtool_attention_mask") else {}
            k, v = cache.update(k, v, idx, **marker)
        if idx in st.last_reader:
            st.store[idx] = (k, v)
    else:
        q = rope_q(_project_q(self, hidden_states, fused, qk_norm), cos, sin)
        try:
            k, v = st.store.pop(src) if st.last_reader[src] == idx else st.store[src]
        except KeyError:
            raise RuntimeError(f"kv sharing: layer {idx} reads layer {src}, which did not run first in this "
                               "forward") from None
    if st.observer is not None:
        st.observer(idx, q, k, v)
    mask = attention_mask
    remap = getattr(_cache_layer(cache, src), "kvtool_attention_mask", None) if cache is not None else None
    if remap is not None:  # a compressed prompt: the mask over positions becomes one over its stored entries
        mask = remap(attention_mask, k.shape[-2], q.shape[1], q.shape[-2], q.dtype)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._kvtool_eager)
    extra = {"sliding_window": self.sliding_window if hasattr(self, "sliding_window")
             else getattr(self.config, "sliding_window", None)}
    if hasattr(self, "attn_logit_softcapping"):
        extra["softcap"] = self.attn_logit_softcapping
    out, weights = interface(self, q, k, v, mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    if st.compressor is not None and cache is not None and src == idx:
        st.compressor.after(self, idx, q, attention_mask, cache)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


def install(model: nn.Module, kv_source_layers: list[int]) -> SharingState:
    """Patch every attention layer of ``model`` (a *ForCausalLM with .model.layers) to follow the map, after checking
    that transformers' internals are the ones this runtime expects."""
    check_internals(model)
    cfg = model.config
    arch = ARCHS[cfg.model_type.removeprefix("kvtool_")]
    last_reader = {s: j for j, s in enumerate(kv_source_layers) if s != j}
    st = SharingState(list(kv_source_layers), last_reader, had_modes=hasattr(cfg, "kv_sharing_modes"),
                      old_modes=getattr(cfg, "kv_sharing_modes", None))
    for layer in model.model.layers:
        attn = layer.self_attn
        mod = sys.modules[type(attn).__module__]
        attn._kvtool_state = st
        attn._kvtool_arch = arch
        attn._kvtool_rope = mod.apply_rotary_pos_emb
        attn._kvtool_eager = mod.eager_attention_forward
        attn.forward = attention_forward.__get__(attn)
    cfg.kv_sharing_modes = ["store" if s == i else "reuse" for i, s in enumerate(kv_source_layers)]
    model._kvtool_state = st
    return st


def uninstall(model: nn.Module) -> None:
    st: SharingState | None = getattr(model, "_kvtool_state", None)
    if st is None:
        return
    for layer in model.model.layers:
        for name in ("forward", "_kvtool_state", "_kvtool_arch", "_kvtool_rope", "_kvtool_eager"):
            layer.self_attn.__dict__.pop(name, None)
    if st.had_modes:
        model.config.kv_sharing_modes = st.old_modes
    elif hasattr(model.config, "kv_sharing_modes"):
        delattr(model.config, "kv_sharing_modes")
    del model._kvtool_state


def drop_kv_modules(model: nn.Module, kv_source_layers: list[int]) -> None:
    """Delete the K/V projections (and k-norm) of consumer layers; a fused qkv_proj keeps only its Q rows."""
    fused = ARCHS[model.config.model_type.removeprefix("kvtool_")]["fused"]
    for j, s in enumerate(kv_source_layers):
        if s == j:
            continue
        attn = model.model.layers[j].self_attn
        if fused:
            qpos = attn.config.num_attention_heads * attn.head_dim
            old = attn.qkv_proj
            if old.weight.shape[0] == qpos:
                continue
            new = nn.Linear(old.in_features, qpos, bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
            if old.weight.device.type != "meta":
                with torch.no_grad():
                    new.weight.copy_(old.weight[:qpos])
                    if old.bias is not None:
                        new.bias.copy_(old.bias[:qpos])
            attn.qkv_proj = new
        else:
            for name in ("k_proj", "v_proj", "k_norm"):
                if isinstance(getattr(attn, name, None), nn.Module):
                    setattr(attn, name, None)


def make_classes(config_cls: type, model_cls: type, module: str | None = None) -> tuple[type, type]:
    """A config class (model_type ``kvtool_<base>``) and a *ForCausalLM class that builds the base architecture
    with sharing installed and the consumers' K/V weights removed; ``from_pretrained`` refuses a checkpoint whose
    tensors do not match the map (a missing or unexpected weight is an error, never a random initialisation)."""
    base_type = config_cls.model_type
    cfg = type("KvtoolConfig", (config_cls,), {"model_type": f"kvtool_{base_type}"})

    def __init__(self, config):
        model_cls.__init__(self, config)
        install(self, config.kv_source_layers)
        drop_kv_modules(self, config.kv_source_layers)

    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(mdl, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(map(str, v)) for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            desc = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:4])}" for k, v in bad.items())
            raise SharingRuntimeError(f"the weights do not match the sharing map in config.json ({desc})")
        return (model, info) if want_info else model

    mdl = type("KvtoolForCausalLM", (model_cls,), {"config_class": cfg, "__init__": __init__,
                                                    "from_pretrained": classmethod(from_pretrained)})
    if module is not None:
        cfg.__module__ = mdl.__module__ = module
    return cfg, mdl
