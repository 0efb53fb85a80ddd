"""Local damage scores: how much layer j's attention output changes when it reads layer i's K/V instead of its own.

From one forward of the unshared model on calibration chunks we keep every layer's queries (after RoPE), keys and
values; for each admissible pair (i < j, same attention type) we recompute layer j's attention with its own queries
over layer i's K/V, project it with j's o_proj, and take the norm of the change relative to the residual stream
entering layer j, per token, averaged (relative to the attention output itself the error is ~1 for almost every
pair on SmolLM2, which does not rank anything; relative to the residual it measures how much of the layer's input
is disturbed).
No forward per pair is needed: one attention call per pair.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtool.crosslayer.archs import decoder_layers, layer_types
from kvtool.crosslayer.runtime import observe


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal (and sliding-window, where the layer has one) attention with GQA, then the layer's o_proj."""
    T = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    pos = torch.arange(T, device=q.device)
    mask = pos[None, :] <= pos[:, None]
    window = getattr(attn, "sliding_window", None)
    if window:
        mask &= pos[:, None] - pos[None, :] < window
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    B = q.shape[0]
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@torch.no_grad()
def local_errors(model: nn.Module, input_ids: torch.Tensor, samples: int = 8) -> torch.Tensor:
    """[L, L] matrix: entry (i, j) = mean relative error of layer j's attention output when it reads layer i's K/V;
    +inf where j may not read i (i >= j, or another attention type)."""
    return local_errors_by_kind(model, input_ids, ("kv",), samples)["kv"]


@torch.no_grad()
def local_errors_by_kind(model: nn.Module, input_ids: torch.Tensor, kinds: tuple[str, ...] = ("kv", "k", "v"),
                         samples: int = 8) -> dict[str, torch.Tensor]:
    """``local_errors`` for each kind of move: layer j reads layer i's keys and values (``"kv"``), its keys with
    j's own values (``"k"``), or its values with j's own keys (``"v"``)."""
    layers = decoder_layers(model)
    L = len(layers)
    types = layer_types(model.config)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    resid: dict[int, torch.Tensor] = {}

    def grab(layer, q, k, v):
        qkv[layer] = (q.detach(), k.detach(), v.detach())

    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kw, idx=idx: resid.__setitem__(idx, (args[0] if args else kw["hidden_states"]).detach()),
        with_kwargs=True) for idx, layer in enumerate(layers)]
    ids = input_ids[:samples].to(next(model.parameters()).device)
    try:
        with observe(model, grab):
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    err = {kind: torch.full((L, L), float("inf")) for kind in kinds}
    for j in range(1, L):
        attn = layers[j].self_attn
        qj, kj, vj = qkv[j]
        own = _attend(attn, qj, kj, vj).float()
        norm = resid[j].float().norm(dim=-1).clamp_min(1e-6)
        for i in range(j):
            if types[i] != types[j]:
                continue
            _, ki, vi = qkv[i]
            for kind in kinds:
                k, v = {"kv": (ki, vi), "k": (ki, vj), "v": (kj, vi)}[kind]
                other = _attend(attn, qj, k, v).float()
                err[kind][i, j] = float(((other - own).norm(dim=-1) / norm).mean())
    return err
