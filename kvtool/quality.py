"""Quality measures on token chunks: perplexity, and fidelity of a shared model to its base."""

from __future__ import annotations

import math

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
