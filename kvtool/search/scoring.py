"""Scoring candidate plans against the base model on calibration chunks, incrementally.

A candidate that adds "j reads i" to an accepted plan changes nothing below layer j, so a ``ScoreState`` keeps, for an
accepted plan, every layer's input hidden states and every owner's K/V on every chunk, and a candidate runs only
layers j..L-1 from it. Several states can live at once (a beam of partial maps). A candidate can be scored on a few
chunks first (``batches=``) and completed on the rest only if it wins (``complete``).
Metrics: ``cosine`` (KVSharer's: per-sample cosine of the flattened final hidden states, averaged; higher is better)
and ``kl`` (mean next-token KL(base ‖ candidate) in nats at fixed positions; lower is better).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kvtool.crosslayer.archs import decoder_layers
from kvtool.crosslayer.runtime import observe, preloaded, sharing
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import METRICS
from kvtool.metrics import cosine_score, logits_from_hidden

HIGHER_IS_BETTER = {"cosine": True, "kl": False}
_TOP_K = 64  # the base's top tokens whose logits enter the KL exactly as computed


@dataclass
class _Batch:
    ids: torch.Tensor
    base_final: torch.Tensor
    base_p: torch.Tensor | None = None  # [B, positions, V] base next-token probabilities at the KL positions
    base_plogp: torch.Tensor | None = None  # [B] Σ p log p over positions and vocabulary (mean over positions)
    # without softcapping, Σ_v p_v l_v needs no vocabulary-sized product: the base's top tokens' logits (as the
    # candidate's head computes them, so rounding agrees with its normaliser) plus h · Σ_tail p_v w_v for the rest
    top_idx: torch.Tensor | None = None  # [B, positions, k] the base's most likely tokens
    top_p: torch.Tensor | None = None  # [B, positions, k] their probabilities
    tail_emb: torch.Tensor | None = None  # [B, positions, H] Σ over the other tokens of p_v w_v
    tail_bias: torch.Tensor | None = None  # [B, positions] Σ over the other tokens of p_v bias_v
    kwargs: list[dict] = field(default_factory=list)  # per layer, as the model called it (the same for every plan)


@dataclass
class ScoreState:
    """An accepted plan's activations on every chunk: each layer's input and each owner's K/V."""

    plan: SharingPlan
    h_in: list[list[torch.Tensor]]  # [batch][layer]
    kv: list[dict[tuple[str, int], torch.Tensor]]  # [batch] ("k"|"v", owner layer) -> its keys or values
    value: float = 0.0


@dataclass
class Scored:
    """A candidate's score on some chunks, and what it captured there (to complete it or make it a state)."""

    plan: SharingPlan
    start: int
    vals: dict[int, torch.Tensor]  # batch index -> per-sample metric
    caps: dict[int, tuple[dict, dict]]  # batch index -> (new layer inputs, new owner K/V)

    def value(self) -> float:
        return float(torch.cat([self.vals[k] for k in sorted(self.vals)]).mean())


class Scorer:
    """Scores plans on calibration chunks against the base model's stored final hidden states."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, base_final: torch.Tensor, metric: str = "cosine",
                 batch_size: int = 8, incremental: bool = True, kl_positions: int = 32, own_reference: bool = False):
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
        self.layer_forwards = 0
        self.seconds = {"layers": 0.0, "lm_head": 0.0, "metric": 0.0}
        # ``own_reference``: compare against this model's own unshared outputs (computed once, by the first
        # ``initial``, with the identity plan) instead of the calibration's stored ones, e.g. when scoring a
        # lower-precision copy, so that the unshared model scores exactly 0 KL / cosine 1
        self.own_reference = own_reference
        self._reference_pending = own_reference
        self._linear_head = not getattr(model.config, "final_logit_softcapping", None)
        if not own_reference:
            for b in self.batches:
                self._set_reference(b, b.base_final)

    @torch.no_grad()
    def _set_reference(self, b: _Batch, final: torch.Tensor) -> None:
        """The base model's outputs the metric compares against."""
        b.base_final = final.float().cpu()
        if self.metric == "kl":
            h = final[:, self.kl_pos].to(self.device, next(self.model.parameters()).dtype)
            logp = torch.log_softmax(logits_from_hidden(self.model, h), -1)
            p = logp.exp()
            b.base_plogp = (p * logp).sum(-1).mean(-1).cpu()
            if self._linear_head:
                head = self.model.lm_head
                w = head.weight.float()
                b.top_p, b.top_idx = p.topk(min(_TOP_K, p.shape[-1]), dim=-1)
                tail = p.scatter(-1, b.top_idx, 0.0)
                b.tail_emb = tail @ w
                b.tail_bias = None if head.bias is None else tail @ head.bias.float()
            else:
                b.base_p = p.cpu()

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    # ---- forward passes --------------------------------------------------------------------------------------------
    def _capture_full(self, b: _Batch, plan: SharingPlan) -> tuple[torch.Tensor, list, dict]:
        """Full forward under ``plan``; returns (final hidden, per-layer inputs, owner K/V) and records kwargs."""
        hooks, h_in, kv, kwargs = [], [None] * self.L, {}, [None] * self.L

        def pre(idx):
            def fn(_mod, args, kw):
                h_in[idx] = (args[0] if args else kw["hidden_states"]).detach()
                kwargs[idx] = {k: v for k, v in kw.items() if k != "hidden_states"}
            return fn

        ks, vs = plan.k_sources, plan.v_sources

        def obs(layer, q, k, v):
            if ks[layer] == layer:
                kv[("k", layer)] = k.detach()
            if vs[layer] == layer:
                kv[("v", layer)] = v.detach()

        for i, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        t0 = time.perf_counter()
        try:
            with observe(self.model, obs):
                out = self.model.model(input_ids=b.ids.to(self.device), use_cache=False).last_hidden_state
        finally:
            for hk in hooks:
                hk.remove()
        self.seconds["layers"] += time.perf_counter() - t0
        b.kwargs = kwargs
        self.layer_forwards += self.L
        return out, h_in, kv

    def _run_from(self, state: ScoreState, k: int, start: int, plan: SharingPlan):
        """Layers start..L-1 of batch ``k`` from the state's stored input, under ``plan`` (already installed);
        returns (final, (new layer inputs, new owner K/V))."""
        kv = state.kv[k]
        ks, vs = plan.k_sources, plan.v_sources
        below = {(t, src[j]): kv[(t, src[j])] for j in range(start, self.L) for t, src in (("k", ks), ("v", vs))
                 if src[j] != j and src[j] < start}  # the K/V of owners below ``start`` that layers from it read
        h = state.h_in[k][start]
        new_h, new_kv = {}, {}

        def obs(layer, q, k_, v):
            if ks[layer] == layer:
                new_kv[("k", layer)] = k_.detach()
            if vs[layer] == layer:
                new_kv[("v", layer)] = v.detach()

        t0 = time.perf_counter()
        with preloaded(self.model, below, obs):
            for idx in range(start, self.L):
                new_h[idx] = h
                h = self.layers[idx](h, **self.batches[k].kwargs[idx])
            h = self.model.model.norm(h)
        self.seconds["layers"] += time.perf_counter() - t0
        self.layer_forwards += self.L - start
        return h, (new_h, new_kv)

    def _metric(self, b: _Batch, final: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            t0 = time.perf_counter()
            out = cosine_score(final.float().cpu(), b.base_final)
            self.seconds["metric"] += time.perf_counter() - t0
            return out
        t0 = time.perf_counter()
        h = final[:, self.kl_pos]
        logits = logits_from_hidden(self.model, h)
        t1 = time.perf_counter()
        # KL(p‖q) = Σ p log p − Σ p log q, and Σ_v p_v log q_v = Σ_v p_v l_v − logsumexp(l)
        if b.tail_emb is not None:
            cross = (b.top_p * logits.gather(-1, b.top_idx)).sum(-1) + (h.float() * b.tail_emb).sum(-1)
            if b.tail_bias is not None:
                cross = cross + b.tail_bias
        else:
            p = b.base_p.to(logits.device)
            cross = torch.bmm(p.view(-1, 1, p.shape[-1]), logits.view(-1, logits.shape[-1], 1)).view(p.shape[:-1])
        kl = (b.base_plogp.to(logits.device) - (cross - torch.logsumexp(logits, -1)).mean(-1)).cpu()
        self.seconds["lm_head"] += t1 - t0
        self.seconds["metric"] += time.perf_counter() - t1
        return kl

    # ---- public API ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initial(self, plan: SharingPlan) -> ScoreState:
        """The state of ``plan`` (one full forward per batch) with its score."""
        state = ScoreState(plan, [], [])
        vals = []
        if self._reference_pending and plan.readers:  # the reference first: the unshared model, once
            self.initial(SharingPlan.identity(self.L))
        with sharing(self.model, plan):
            for b in self.batches:
                final, h_in, kv = self._capture_full(b, plan)
                if self._reference_pending:
                    self._set_reference(b, final)  # the base model's output under the scoring precision
                state.h_in.append(h_in)
                state.kv.append(kv)
                vals.append(self._metric(b, final))
        self._reference_pending = False
        state.value = float(torch.cat(vals).mean())
        return state

    @torch.no_grad()
    def score(self, state: ScoreState, plan: SharingPlan, start: int | None = None,
              batches: list[int] | None = None) -> Scored:
        """Score ``plan`` (equal to ``state.plan`` below layer ``start``) on ``batches`` (default: all)."""
        if start is None:
            old = state.plan
            changed = [j for j in range(self.L) if (plan.k_sources[j], plan.v_sources[j]) !=
                       (old.k_sources[j], old.v_sources[j])]
            start = changed[0] if changed else self.L - 1
        return self.complete(state, Scored(plan, start, {}, {}), batches)

    @torch.no_grad()
    def complete(self, state: ScoreState, scored: Scored, batches: list[int] | None = None) -> Scored:
        """Score ``scored`` on the ``batches`` (default: all) it has not seen yet."""
        todo = [k for k in (range(self.num_batches) if batches is None else batches) if k not in scored.vals]
        if not todo:
            return scored
        with sharing(self.model, scored.plan):
            for k in todo:
                b = self.batches[k]
                if self.incremental:
                    final, cap = self._run_from(state, k, scored.start, scored.plan)
                else:
                    final, h_in, kv = self._capture_full(b, scored.plan)
                    cap = ({i: h for i, h in enumerate(h_in) if i >= scored.start},
                           {key: x for key, x in kv.items() if key[1] >= scored.start})
                scored.vals[k] = self._metric(b, final)
                scored.caps[k] = cap
        return scored

    def advance(self, state: ScoreState, scored: Scored) -> ScoreState:
        """The state of a candidate scored on every batch (its captured activations, the rest shared with
        ``state``)."""
        if len(scored.vals) != self.num_batches:
            raise RuntimeError("complete() a candidate on every batch before advancing to it")
        h_in, kv = [], []
        for k in range(self.num_batches):
            new_h, new_kv = scored.caps[k]
            h_in.append([new_h.get(i, h) for i, h in enumerate(state.h_in[k])])
            kv.append({**{key: x for key, x in state.kv[k].items() if key[1] < scored.start}, **new_kv})
        return ScoreState(scored.plan, h_in, kv, scored.value())

    def passes(self, value: float, threshold: float) -> bool:
        return value >= threshold if HIGHER_IS_BETTER[self.metric] else value <= threshold
