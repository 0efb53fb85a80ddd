"""Eval tasks ``ppl`` and ``fidelity``: perplexity of both variants on held-out text, and how closely the shared
model follows the base (next-token KL, top-1 agreement, final hidden cosine), in one pass."""

from __future__ import annotations

import math
from typing import Any

import torch

from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device
from kvtool.metrics import cosine_score, kl_div, nll_sum


@torch.no_grad()
def quality(v: Variants, input_ids: torch.Tensor, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity of every variant and the shared one's fidelity to the base, one pass over ``input_ids``."""
    nll = dict.fromkeys(v.names, 0.0)
    kl = agree = cos = 0.0
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s : s + batch_size]
        outs = {}
        for which in v.names:
            with v.use(which) as m:
                o = m(input_ids=ids.to(model_device(m)), use_cache=False, output_hidden_states=True)
                logits = o.logits.float().cpu()
                outs[which] = (torch.log_softmax(logits, -1), o.hidden_states[-1].float().cpu())
                nll[which] += nll_sum(logits[:, :-1], ids[:, 1:])[0]
        (lp_b, h_b), (lp_s, h_s) = outs["base"], outs["shared"]
        kl += float(kl_div(lp_b, lp_s).sum())
        agree += float((lp_b.argmax(-1) == lp_s.argmax(-1)).float().sum())
        cos += float(cosine_score(h_b, h_s).sum())
    n_pred = input_ids[:, 1:].numel()
    n_tok = input_ids.numel()
    ppl = {k: math.exp(x / n_pred) for k, x in nll.items()}
    ratios = {f"ratio_{k}": x / ppl["base"] for k, x in ppl.items() if k not in ("base", "shared")}
    return {"ppl": {**ppl, "ratio": ppl["shared"] / ppl["base"], **ratios, "tokens": n_pred},
            "fidelity": {"kl": kl / n_tok, "top1_agreement": agree / n_tok, "hidden_cosine": cos / input_ids.shape[0]}}
