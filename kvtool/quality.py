"""Quality measures on token chunks: perplexity, and fidelity of a shared model to its base."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """Perplexity over fixed-length chunks (one forward without a cache each); returns (ppl, scored tokens)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count), count


@dataclass
class Fidelity:
    kl: float  # mean next-token KL(base || shared), nats
    top1_agreement: float  # fraction of positions where the argmax matches
    hidden_cosine: float  # mean per-sample cosine of the final hidden states


@torch.no_grad()
def fidelity(base_logits: list[torch.Tensor], base_hidden: list[torch.Tensor], model: nn.Module,
             input_ids: torch.Tensor, batch_size: int = 4) -> Fidelity:
    """Compare ``model`` with precomputed base outputs (lists of per-batch logits and final hidden states)."""
    device = next(model.parameters()).device
    kls, agree, cos, n = 0.0, 0.0, 0.0, 0
    for k, s in enumerate(range(0, input_ids.shape[0], batch_size)):
        ids = input_ids[s : s + batch_size].to(device)
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        logq = torch.log_softmax(out.logits.float(), -1).cpu()
        logp = torch.log_softmax(base_logits[k].float(), -1)
        kls += float((logp.exp() * (logp - logq)).sum(-1).sum())
        agree += float((logp.argmax(-1) == logq.argmax(-1)).float().sum())
        h = out.hidden_states[-1].float().cpu()
        cos += float(nn.functional.cosine_similarity(h.flatten(1), base_hidden[k].flatten(1), dim=1).sum())
        n += ids.shape[0]
    tokens = input_ids.shape[0] * input_ids.shape[1]
    return Fidelity(kl=kls / tokens, top1_agreement=agree / tokens, hidden_cosine=cos / n)


@torch.no_grad()
def base_outputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4):
    """Per-batch logits and final hidden states of ``model`` (run it before applying a plan)."""
    device = next(model.parameters()).device
    logits, hidden = [], []
    for s in range(0, input_ids.shape[0], batch_size):
        out = model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False, output_hidden_states=True)
        logits.append(out.logits.float().cpu())
        hidden.append(out.hidden_states[-1].float().cpu())
    return logits, hidden
