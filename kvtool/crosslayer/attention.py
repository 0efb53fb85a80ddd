"""Cross-layer KV sharing inside a transformers model: the attention forward every patched layer runs.

Self-contained (torch + transformers only): ``kvtool export`` copies this file beside the weights as
``kvtool_sharing.py``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs the same code
without kvtool installed.

- An *owner* projects Q/K/V exactly as the original module (bit-identical), updates its cache slot, and, if a later
  layer reads it, leaves the K/V it attends over in a per-model store.
- A *consumer* projects only its queries (RoPE on Q only), takes its source's K/V from the store, and applies its own
  mask, scaling and output projection. Its cache slot is a ``DummyLayer`` (``config.kv_sharing_modes``), so it
  stores nothing; its K/V projections are never called.
- Keys and values may come from different layers: a layer that owns only its keys (or only its values) projects and
  caches just that tensor (its slot stores a zero-width stand-in for the other) and reads the other from its source.
The store is filled and emptied within one forward, so sharing holds with and without a cache.
An optional ``merge_hook`` (set by ``kvtool.merge``; exports run without it) merges an owner's
prompt KV after its prefill attention. A compressed cache layer carries its own entry map
(``kvtool_attention_mask``), which maps the attention mask over positions onto its stored entries, so a compressed
cache keeps decoding correctly after the merge hook is gone.
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
    kv_source_layers: list[int]  # the common key/value source of each layer (itself where they differ)
    k_sources: list[int]  # where each layer's keys come from
    v_sources: list[int]  # ... and its values
    last_reader: dict[tuple[str, int], int]  # ("k"|"v", source layer) -> the last layer that reads it (and pops it)
    store: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # ("k"|"v", owner) -> tensor
    observer: object = None  # optional callable(layer, q, k, v)
    merge_hook: object = None  # optional prompt-KV merge hook (kvtool.merging.hook.MergeHook)
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


def _fused_part(attn: nn.Module, h: torch.Tensor, part: str) -> torch.Tensor:
    """One of q, k, v from a fused qkv_proj whose rows hold the parts ``attn._kvtool_rows`` (in that order)."""
    sizes = {"q": attn.config.num_attention_heads * attn.head_dim, "k": attn.num_key_value_heads * attn.head_dim}
    sizes["v"] = sizes["k"]
    rows = getattr(attn, "_kvtool_rows", ("q", "k", "v"))
    start = sum(sizes[r] for r in rows[: rows.index(part)])
    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
    end = start + sizes[part]
    return nn.functional.linear(h, w[start:end], None if b is None else b[start:end])


def _project_some(attn: nn.Module, h: torch.Tensor, fused: bool, qk_norm: str | None, want_k: bool, want_v: bool):
    """The queries, and the keys and/or values only where wanted (None otherwise), before RoPE: a layer never runs
    the projections of a tensor it reads from another layer."""
    hidden_shape = (*h.shape[:-1], -1, attn.head_dim)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(hidden_shape).transpose(1, 2)

    if fused:
        q = heads(_fused_part(attn, h, "q"))
        k = heads(_fused_part(attn, h, "k")) if want_k else None
        v = heads(_fused_part(attn, h, "v")) if want_v else None
        return q, k, v
    if qk_norm == "pre":
        q = attn.q_norm(attn.q_proj(h).view(hidden_shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(hidden_shape)).transpose(1, 2) if want_k else None
    else:
        q = heads(attn.q_proj(h))
        k = heads(attn.k_proj(h)) if want_k else None
        if qk_norm == "post":
            q = attn.q_norm(q)
            k = attn.k_norm(k) if want_k else None
    v = heads(attn.v_proj(h)) if want_v else None
    return q, k, v


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


def _take(st: SharingState, tensor: str, src: int, idx: int) -> torch.Tensor:
    """The ``tensor`` ("k" or "v") that layer ``src`` left in the store; the last reader takes it out."""
    key = (tensor, src)
    try:
        return st.store.pop(key) if st.last_reader[key] == idx else st.store[key]
    except KeyError:
        raise RuntimeError(f"kv sharing: layer {idx} reads layer {src}'s {'keys' if tensor == 'k' else 'values'}, "
                           "which did not run first in this forward") from None


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
    k_src, v_src = st.k_sources[idx], st.v_sources[idx]
    own_k, own_v = k_src == idx, v_src == idx
    fused, qk_norm = self._kvtool_arch["fused"], self._kvtool_arch["qk_norm"]
    cos, sin = position_embeddings
    if own_k and own_v and getattr(self, "_kvtool_rows", ("q", "k", "v")) == ("q", "k", "v"):
        q, k, v = _project_qkv(self, hidden_states, fused, qk_norm)  # the original ops: bit-identical
    else:
        q, k, v = _project_some(self, hidden_states, fused, qk_norm, own_k, own_v)
    if own_k:
        q, k = self._kvtool_rope(q, k, cos, sin)
    else:
        q = rope_q(q, cos, sin)
    if own_k or own_v:
        if cache is not None:
            if st.merge_hook is not None and own_k and own_v:
                st.merge_hook.prepare(cache, idx)
            # a layer that owns one tensor stores a zero-width stand-in for the other: the cache stays well formed
            # (every layer type counts its length along the sequence axis) and holds no bytes for what it lacks
            ku = k if own_k else v.new_empty(*v.shape[:-1], 0)
            vu = v if own_v else k.new_empty(*k.shape[:-1], 0)
            # a kvtool compressed layer refuses updates from forwards that would not remap its mask
            marker = {"kvtool_runtime": True} if hasattr(_cache_layer(cache, idx), "kvtool_attention_mask") else {}
            ku, vu = cache.update(ku, vu, idx, **marker)
            k, v = (ku if own_k else None), (vu if own_v else None)
        if own_k and ("k", idx) in st.last_reader:
            st.store[("k", idx)] = k
        if own_v and ("v", idx) in st.last_reader:
            st.store[("v", idx)] = v
    if not own_k:
        k = _take(st, "k", k_src, idx)
    if not own_v:
        v = _take(st, "v", v_src, idx)
    if st.observer is not None:
        st.observer(idx, q, k, v)
    mask = attention_mask
    remap = getattr(_cache_layer(cache, k_src), "kvtool_attention_mask", None) if cache is not None else None
    if remap is not None:  # a compressed prompt: the mask over positions becomes one over its stored entries
        mask = remap(attention_mask, k.shape[-2], q.shape[1], q.shape[-2], q.dtype)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._kvtool_eager)
    extra = {"sliding_window": self.sliding_window if hasattr(self, "sliding_window")
             else getattr(self.config, "sliding_window", None)}
    if hasattr(self, "attn_logit_softcapping"):
        extra["softcap"] = self.attn_logit_softcapping
    out, weights = interface(self, q, k, v, mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    if st.merge_hook is not None and cache is not None and own_k and own_v:
        st.merge_hook.after(self, idx, q, attention_mask, cache)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


def _sources(kv_source_layers: list[int], k_source_layers: list[int] | None, v_source_layers: list[int] | None):
    k = list(k_source_layers if k_source_layers is not None else kv_source_layers)
    v = list(v_source_layers if v_source_layers is not None else kv_source_layers)
    return k, v


def install(model: nn.Module, kv_source_layers: list[int], k_source_layers: list[int] | None = None,
            v_source_layers: list[int] | None = None) -> SharingState:
    """Patch every attention layer of ``model`` (a *ForCausalLM with .model.layers) to follow the map (keys and
    values from ``k_source_layers`` / ``v_source_layers`` where given), after checking that transformers' internals
    are the ones this runtime expects."""
    check_internals(model)
    cfg = model.config
    arch = ARCHS[cfg.model_type.removeprefix("kvtool_")]
    k_src, v_src = _sources(kv_source_layers, k_source_layers, v_source_layers)
    last_reader = {(t, s): j for t, src in (("k", k_src), ("v", v_src)) for j, s in enumerate(src) if s != j}
    st = SharingState(list(kv_source_layers), k_src, v_src, last_reader, had_modes=hasattr(cfg, "kv_sharing_modes"),
                      old_modes=getattr(cfg, "kv_sharing_modes", None))
    for layer in model.model.layers:
        attn = layer.self_attn
        mod = sys.modules[type(attn).__module__]
        attn._kvtool_state = st
        attn._kvtool_arch = arch
        attn._kvtool_rope = mod.apply_rotary_pos_emb
        attn._kvtool_eager = mod.eager_attention_forward
        attn.forward = attention_forward.__get__(attn)
    # a layer that reads both its keys and its values elsewhere gets no cache slot (transformers' DummyLayer)
    cfg.kv_sharing_modes = ["reuse" if k_src[i] != i and v_src[i] != i else "store" for i in range(len(k_src))]
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


def drop_kv_modules(model: nn.Module, kv_source_layers: list[int], k_source_layers: list[int] | None = None,
                    v_source_layers: list[int] | None = None) -> None:
    """Delete the key projection (and k-norm) of every layer that reads its keys elsewhere, and the value projection
    of every layer that reads its values elsewhere; a fused qkv_proj keeps only the rows of what the layer owns."""
    fused = ARCHS[model.config.model_type.removeprefix("kvtool_")]["fused"]
    k_src, v_src = _sources(kv_source_layers, k_source_layers, v_source_layers)
    for j in range(len(k_src)):
        own = {"k": k_src[j] == j, "v": v_src[j] == j}
        if own["k"] and own["v"]:
            continue
        attn = model.model.layers[j].self_attn
        if fused:
            rows = tuple(r for r in ("q", "k", "v") if r == "q" or own[r])
            old_rows = getattr(attn, "_kvtool_rows", ("q", "k", "v"))
            if rows == old_rows:
                continue
            old = attn.qkv_proj
            size = {"q": attn.config.num_attention_heads * attn.head_dim,
                    "k": attn.num_key_value_heads * attn.head_dim, "v": attn.num_key_value_heads * attn.head_dim}
            new = nn.Linear(old.in_features, sum(size[r] for r in rows), bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            if old.weight.device.type != "meta":
                offset = {r: sum(size[x] for x in old_rows[: old_rows.index(r)]) for r in old_rows}
                with torch.no_grad():
                    new.weight.copy_(torch.cat([old.weight[offset[r] : offset[r] + size[r]] for r in rows]))
                    if old.bias is not None:
                        new.bias.copy_(torch.cat([old.bias[offset[r] : offset[r] + size[r]] for r in rows]))
            attn.qkv_proj = new
            attn._kvtool_rows = rows
        else:
            for name in (("k_proj", "k_norm") if not own["k"] else ()) + (("v_proj",) if not own["v"] else ()):
                if isinstance(getattr(attn, name, None), nn.Module):
                    setattr(attn, name, None)


def class_name(model_cls: type) -> str:
    """An export's architecture name: ``Kvtool`` + the base class (``KvtoolLlamaForCausalLM``), never the base's own
    name, so no engine builds the unshared base from a checkpoint that lacks the consumers' K/V."""
    return f"Kvtool{model_cls.__name__}"


def make_classes(config_cls: type, model_cls: type, module: str | None = None) -> tuple[type, type]:
    """A config class (model_type ``kvtool_<base>``) and a *ForCausalLM class (``class_name``) that builds the base
    architecture
    with sharing installed and the consumers' K/V weights removed; ``from_pretrained`` refuses a checkpoint whose
    tensors do not match the map (a missing or unexpected weight is an error, never a random initialisation)."""
    base_type = config_cls.model_type
    cfg = type("KvtoolConfig", (config_cls,), {"model_type": f"kvtool_{base_type}"})

    def __init__(self, config):
        model_cls.__init__(self, config)
        maps = (config.kv_source_layers, getattr(config, "k_source_layers", None),
                getattr(config, "v_source_layers", None))
        install(self, *maps)
        drop_kv_modules(self, *maps)

    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(mdl, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(map(str, v)) for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            desc = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:4])}" for k, v in bad.items())
            raise SharingRuntimeError(f"the weights do not match the sharing map in config.json ({desc})")
        return (model, info) if want_info else model

    mdl = type(class_name(model_cls), (model_cls,), {"config_class": cfg, "__init__": __init__,
                                                    "from_pretrained": classmethod(from_pretrained)})
    if module is not None:
        cfg.__module__ = mdl.__module__ = module
    return cfg, mdl
