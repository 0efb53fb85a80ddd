"""The architectures kvtool's runtime knows, and how to find their layers, attention types and K/V weights."""

from __future__ import annotations

import torch

from kvtool.crosslayer.attention import ARCHS  # one table, shared with exported checkpoints
from kvtool.errors import KvtoolError


def arch_of(model_or_config) -> dict[str, object]:
    config = getattr(model_or_config, "config", model_or_config)
    mt = str(getattr(config, "model_type", None)).removeprefix("kvtool_")  # an export is its base architecture
    if mt not in ARCHS:
        raise KvtoolError(f"model type {mt!r} is not supported for KV sharing; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[mt]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    arch_of(model)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise KvtoolError(f"{type(model).__name__} has no .model.layers; kvtool needs a *ForCausalLM model")
    return layers


def layer_types(config) -> list[str]:
    """Attention type of each layer ("full_attention" or "sliding_attention")."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def kv_param_names(model: torch.nn.Module, layer: int, tensors: str = "kv") -> list[str]:
    """Names of the key ("k": k_proj and k-norm) and/or value ("v": v_proj) projection parameters of one layer, as in
    ``model.state_dict()``."""
    arch = arch_of(model)
    prefix = f"model.layers.{layer}.self_attn."
    attn = decoder_layers(model)[layer].self_attn
    names: list[str] = []
    if arch["fused"]:
        return []  # fused qkv: the K/V rows are sliced off in place, see attention.drop_kv_modules
    mods = (("k_proj", "k_norm") if "k" in tensors else ()) + (("v_proj",) if "v" in tensors else ())
    for mod in mods:
        sub = getattr(attn, mod, None)
        if isinstance(sub, torch.nn.Module):
            names += [prefix + f"{mod}.{n}" for n, _ in sub.named_parameters()]
    return names


def kv_dims(config) -> tuple[int, int]:
    """(num KV heads, head dim)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim
