"""Quality measures, one implementation each: token NLL and perplexity, KL between next-token distributions, and the
cosine of final hidden states (KVSharer's output similarity)."""

from __future__ import annotations

import math

import torch
from torch import nn


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ``targets`` [..., T] under ``logits`` [..., T, V]; returns (nll, tokens)."""
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       reduction="sum")
    return float(loss), targets.numel()


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """Perplexity over fixed-length chunks (one forward without a cache each); returns (ppl, scored tokens)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s : s + batch_size].to(device)
        a, n = nll_sum(model(input_ids=ids, use_cache=False).logits[:, :-1], ids[:, 1:])
        nll, count = nll + a, count + n
    return math.exp(nll / count), count


def logits_from_hidden(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The LM head on final (normed) hidden states, with the final softcap where the model has one."""
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def kl_div(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from log-probabilities [..., V] -> [...]."""
    return (logp.float().exp() * (logp.float() - logq.float())).sum(-1)


def kl_per_sample(logp_base: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base ‖ candidate) -> [B]; ``logp_base`` are log-probabilities."""
    return kl_div(logp_base, torch.log_softmax(logits.float(), -1)).mean(-1)


def cosine_score(h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened [T, H] final hidden states -> [B]."""
    return nn.functional.cosine_similarity(h.flatten(1).float(), base.flatten(1).float(), dim=1)
