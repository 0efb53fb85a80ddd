"""Eval tasks ``ppl`` and ``fidelity``: perplexity of both variants on held-out text, and how closely the shared
model follows the base (next-token KL, top-1 agreement, final hidden cosine), in one pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtool.data.texts import heldout_chunks
from kvtool.evaluation.task import EvalContext, EvalTask, Row, opt
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


def _pass(ctx: EvalContext, samples: int, seq_len: int) -> dict[str, Any]:
    """One pass over the held-out windows (shared by ppl and fidelity when their settings agree)."""
    def make() -> dict[str, Any]:
        ctx.log(f"perplexity and fidelity on held-out text ({samples} × {seq_len} tokens)")
        ch = heldout_chunks(ctx.v.tokenizer, samples, seq_len, ctx.data)
        q = quality(ctx.v, ch.input_ids)
        q["ppl"]["data"] = ch.source
        return q

    return ctx.once(("quality", samples, seq_len), make)


@dataclass
class Perplexity(EvalTask):
    """Perplexity of both variants on held-out text."""

    name: ClassVar[str] = "ppl"
    help: ClassVar[str] = "perplexity on held-out text"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"samples": 8}
    samples: int = opt(4, "held-out windows", min=1)
    seq_len: int = opt(256, "tokens per window", min=8)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        return _pass(ctx, self.samples, self.seq_len)["ppl"]

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        out = {"ppl_base": result["base"], "ppl_shared": result["shared"]}
        if "unhealed" in result:
            out["ppl_unhealed"] = result["unhealed"]
        return out

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        p = result
        rows = [(f"perplexity ({p['tokens']} tokens)", f"{p['base']:,.2f}", f"{p['shared']:,.2f}", f"{p['ratio']:.3f}")]
        if "unhealed" in p:
            rows.append(("perplexity before healing", "", f"{p['unhealed']:,.2f}", f"{p['ratio_unhealed']:.3f}"))
        return rows


@dataclass
class Fidelity(EvalTask):
    """How closely the shared model follows the base on held-out text."""

    name: ClassVar[str] = "fidelity"
    help: ClassVar[str] = "next-token KL, top-1 agreement and hidden cosine against the base"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"samples": 8}
    samples: int = opt(4, "held-out windows", min=1)
    seq_len: int = opt(256, "tokens per window", min=8)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        return _pass(ctx, self.samples, self.seq_len)["fidelity"]

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        return [("KL(base‖shared), nats/token", "0", f"{result['kl']:.4f}", ""),
                ("top-1 agreement", "1", f"{result['top1_agreement']:.3f}", ""),
                ("final hidden cosine", "1", f"{result['hidden_cosine']:.3f}", "")]
