"""Scoring a candidate plan against the base model on calibration chunks, incrementally.

A candidate that adds "j reads i" changes nothing below layer j, so the ``Scorer`` keeps, for the currently accepted
plan, every layer's input hidden states and every owner's K/V, and runs only layers j..L-1 for a candidate.
Metrics: ``cosine`` (KVSharer's: per-sample cosine of the flattened final hidden states, averaged; higher is better)
and ``kl`` (mean next-token KL(base || candidate) in nats; lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvtool.crosslayer.archs import decoder_layers
from kvtool.crosslayer.runtime import observe, sharing, sharing_state
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import METRICS
from kvtool.metrics import cosine_score, kl_per_sample, logits_from_hidden

HIGHER_IS_BETTER = {"cosine": True, "kl": False}


@dataclass
class _Batch:
    ids: torch.Tensor
    base_final: torch.Tensor
    base_logp: torch.Tensor | None = None  # [B, positions, V] at the KL positions
    kwargs: list[dict] = field(default_factory=list)  # per layer, as the model called it
    h_in: list[torch.Tensor | None] = field(default_factory=list)  # per layer input, accepted plan
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # owner K/V, accepted plan


class Scorer:
    """Scores plans on calibration chunks against stored base final hidden states."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, base_final: torch.Tensor, metric: str = "cosine",
                 batch_size: int = 16, incremental: bool = True, kl_positions: int = 32):
        if metric not in METRICS:
            raise KvtoolError(f"unknown validation metric {metric!r}; use one of {', '.join(METRICS)}")
        self.model, self.metric, self.incremental = model, metric, incremental
        self.layers = decoder_layers(model)
        self.L = len(self.layers)
        self.device = next(model.parameters()).device
        T = input_ids.shape[1]
        # KL on a fixed, evenly spaced subset of positions per sample keeps the LM head affordable
        self.kl_pos = torch.linspace(0, T - 1, min(T, kl_positions)).round().long().unique()
        self.batches = [_Batch(input_ids[s : s + batch_size], base_final[s : s + batch_size])
                        for s in range(0, input_ids.shape[0], batch_size)]
        if metric == "kl":
            with torch.no_grad():
                for b in self.batches:
                    h = b.base_final[:, self.kl_pos].to(self.device, next(model.parameters()).dtype)
                    b.base_logp = torch.log_softmax(logits_from_hidden(model, h), -1).cpu()
        self.plan: SharingPlan | None = None
        self.full_forwards = 0
        self.layer_forwards = 0

    # ---- forward passes --------------------------------------------------------------------------------------------
    def _capture_full(self, b: _Batch) -> torch.Tensor:
        """Full forward of the current sharing plan; records per-layer kwargs, inputs and owner K/V."""
        hooks, h_in, kv, kwargs = [], [None] * self.L, {}, [None] * self.L

        def pre(idx):
            def fn(_mod, args, kw):
                h_in[idx] = (args[0] if args else kw["hidden_states"]).detach()
                kwargs[idx] = {k: v for k, v in kw.items() if k != "hidden_states"}
            return fn

        def obs(layer, q, k, v):
            if self.plan.kv_source_layers[layer] == layer:
                kv[layer] = (k.detach(), v.detach())

        for i, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        try:
            with observe(self.model, obs):
                out = self.model.model(input_ids=b.ids.to(self.device), use_cache=False).last_hidden_state
        finally:
            for hk in hooks:
                hk.remove()
        b.kwargs, b.h_in, b.kv = kwargs, h_in, kv
        self.full_forwards += 1
        self.layer_forwards += self.L
        return out

    def _run_from(self, b: _Batch, start: int, plan: SharingPlan, capture: bool):
        """Layers start..L-1 from the accepted model's stored input, under ``plan``; returns (final, captured)."""
        st = sharing_state(self.model)
        # the K/V of owners below ``start`` that layers from ``start`` on read
        for j in range(start, self.L):
            i = plan.kv_source_layers[j]
            if i != j and i < start:
                st.store[i] = b.kv[i]
        h = b.h_in[start]
        new_h, new_kv = {}, {}

        def obs(layer, q, k, v):
            if capture and plan.kv_source_layers[layer] == layer:
                new_kv[layer] = (k.detach(), v.detach())

        st.observer = obs
        try:
            for idx in range(start, self.L):
                if capture:
                    new_h[idx] = h
                h = self.layers[idx](h, **b.kwargs[idx])
        finally:
            st.observer = None
            st.store.clear()
        self.layer_forwards += self.L - start
        return self.model.model.norm(h), (new_h, new_kv)

    def _metric(self, b: _Batch, final: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return cosine_score(final.cpu(), b.base_final)
        logits = logits_from_hidden(self.model, final[:, self.kl_pos])
        return kl_per_sample(b.base_logp, logits.cpu())

    # ---- public API ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, plan: SharingPlan) -> float:
        """Make ``plan`` the accepted plan (one full forward) and return its score."""
        self.plan = plan
        vals = []
        with sharing(self.model, plan):
            for b in self.batches:
                vals.append(self._metric(b, self._capture_full(b)))
        return float(torch.cat(vals).mean())

    @torch.no_grad()
    def score(self, plan: SharingPlan, start: int | None = None) -> tuple[float, object]:
        """Score ``plan`` (which must equal the accepted plan below layer ``start``); returns (score, token)."""
        if self.plan is None:
            raise RuntimeError("Scorer.reset(plan) first")
        if start is None:
            changed = [j for j in range(self.L) if plan.kv_source_layers[j] != self.plan.kv_source_layers[j]]
            start = changed[0] if changed else self.L - 1
        vals, caps = [], []
        with sharing(self.model, plan):
            for b in self.batches:
                if self.incremental:
                    final, cap = self._run_from(b, start, plan, capture=True)
                else:
                    saved = (b.kwargs, b.h_in, b.kv)
                    final = self._capture_full(b)  # the base model's output is already normed
                    cap = (b.kwargs, b.h_in, b.kv)
                    b.kwargs, b.h_in, b.kv = saved
                vals.append(self._metric(b, final))
                caps.append(cap)
        return float(torch.cat(vals).mean()), (plan, start, caps)

    def accept(self, token: object) -> None:
        """Make a scored plan the accepted one, reusing what its scoring run captured."""
        plan, start, caps = token
        for b, cap in zip(self.batches, caps, strict=True):
            if self.incremental:
                new_h, new_kv = cap
                for idx, h in new_h.items():
                    b.h_in[idx] = h
                for layer in list(b.kv):
                    if layer >= start:
                        del b.kv[layer]
                b.kv.update(new_kv)
            else:
                b.kwargs, b.h_in, b.kv = cap
        self.plan = plan

    def better(self, a: float, b: float) -> bool:
        return a > b if HIGHER_IS_BETTER[self.metric] else a < b

    def passes(self, value: float, threshold: float) -> bool:
        return value >= threshold if HIGHER_IS_BETTER[self.metric] else value <= threshold
