"""``kvtool eval --merge-budget``: the merge methods (KVMerger and attnmerge against H2O and StreamingLLM eviction)
at the same budgets, on the base model and on the shared one, in one harness: KV bytes after prefill, passkey
retrieval on long prompts, and perplexity of a continuation read over a merged long context.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import DynamicCache

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.kv_check import prefill_kv_bytes
from kvtool.data.passkey import MERGE_PASSKEY_DEPTHS, build_cases, even_depths
from kvtool.data.texts import heldout_chunks
from kvtool.errors import KvtoolError
from kvtool.evaluation.passkey import passkey_accuracy
from kvtool.evaluation.task import EvalContext, EvalTask, opt
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device
from kvtool.merging.hook import merge
from kvtool.merging.methods import METHODS, MergeMethod, make_method, method_names
from kvtool.metrics import nll_sum
from kvtool.progress import Log


@torch.no_grad()
def long_context_nll(model, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """Summed NLL of ``ids[:, context:]`` read after a prefill of ``ids[:, :context]`` (merged when merging is on),
    in one continuation forward; returns (nll, predicted tokens)."""
    ids = ids.to(model_device(model))
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :context], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1:]
    rest = model(ids[:, context:-1], use_cache=True, **cache_kwargs(model, cache)).logits
    return nll_sum(torch.cat([first, rest], dim=1), ids[:, context:])


def measure(model, tok, method: MergeMethod | None, cases, long_ids: torch.Tensor,
            context: int) -> tuple[int, float, float]:
    """The merge task's three numbers under ``method`` (None: no merging): KV bytes after the prefill of the
    middle passkey case, passkey accuracy over ``cases``, and the perplexity of each ``long_ids`` row after
    ``context`` tokens merged at prefill."""
    with merge(model, method) if method is not None else contextlib.nullcontext():
        kv = prefill_kv_bytes(model, cases[len(cases) // 2].input_ids)
        acc = passkey_accuracy(model, tok, cases)
        nll, n = 0.0, 0
        for i in range(long_ids.shape[0]):
            a, b = long_context_nll(model, long_ids[i : i + 1], context)
            nll, n = nll + a, n + b
    return kv, acc, float(torch.tensor(nll / n).exp())


def compare_merging(v: Variants, budgets: list[float], methods: tuple[str, ...] | None = None, *,
                    passkey_length: int = 2048, passkey_depths: tuple[float, ...] = MERGE_PASSKEY_DEPTHS,
                    ppl_samples: int = 4, ppl_context: int = 1536, ppl_new: int = 512, data: str | None = None,
                    plan_merge: MergeMethod | None = None, log: Log | None = None) -> dict[str, Any]:
    """One row per (variant, method, budget), plus each variant without merging; ratios are against the base
    model's full cache. Each method runs with its own defaults (and the plan's protected layers when the plan names
    them), except the plan's method at the plan's budget, which runs with the plan's settings (its calibrated layer
    budgets included)."""
    methods = tuple(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise KvtoolError(f"unknown merge method(s) {', '.join(bad)}; use {method_names()}")
    say = log or (lambda msg: None)
    tok = v.tokenizer
    cases = build_cases(tok, (passkey_length,), passkey_depths, seed=7)
    long_ids = heldout_chunks(tok, ppl_samples, ppl_context + ppl_new, data).input_ids
    rows: list[dict[str, Any]] = []
    base_bytes = None
    for which in ("base", "shared"):
        with v.use(which) as m:
            for method, budget in [("none", None), *[(mt, b) for b in budgets for mt in methods]]:
                t0 = time.time()
                if method == "none":
                    chosen = None
                elif plan_merge is not None and plan_merge.name == method and plan_merge.budget == budget:
                    chosen = plan_merge
                else:  # the method's own defaults, and the plan's protected layers when it names them
                    shared = {} if plan_merge is None or plan_merge.protected_layers is None else {
                        "protected_layers": plan_merge.protected_layers}
                    chosen = make_method(method, budget=budget, **shared)
                kv, acc, ppl = measure(m, tok, chosen, cases, long_ids, ppl_context)
                if base_bytes is None:
                    base_bytes = kv
                row = {"variant": which, "method": method, "budget": budget,
                       "layer_budgets": "calibrated" if chosen is not None and chosen.layer_budgets else "even",
                       "kv_bytes_prefill": kv,
                       "kv_ratio": kv / base_bytes, "passkey": acc, "ppl": ppl,
                       "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                shown = "-" if budget is None else budget
                say(f"{which:6s} {method:9s} budget {shown:>4}: KV {row['kv_ratio']:.3f} of base, "
                    f"passkey@{passkey_length} {acc:.2f}, long-context ppl {row['ppl']:.2f}")
    return {"passkey_length": passkey_length, "passkey_depths": list(passkey_depths), "ppl_samples": ppl_samples,
            "ppl_context": ppl_context, "ppl_new": ppl_new, "budgets": budgets, "methods": list(methods),
            "rows": rows}


@dataclass
class Merge(EvalTask):
    """The merge methods against eviction at the same budgets (runs when a budget is given or the plan has one)."""

    name: ClassVar[str] = "merge"
    help: ClassVar[str] = "prompt-KV merge methods vs eviction at equal budgets (needs a budget)"
    default: ClassVar[bool] = True
    FULL: ClassVar[dict[str, Any]] = {"length": 2048, "depths": 10, "ppl_samples": 4}
    budgets: tuple[float, ...] = opt((), "shares of the prompt KV to keep (default: the plan's merge budget)")
    methods: tuple[str, ...] = opt((), "merge methods (default: every name in kvtool.METHODS)")
    length: int = opt(1024, "passkey prompt length; the long-context perplexity reads 3/4 of it, predicts 1/4",
                      min=64)
    depths: int = opt(4, "passkey depths, evenly spaced", min=1)
    ppl_samples: int = opt(2, "long-context perplexity windows", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for b in self.budgets:
            if not 0 < b <= 1:
                raise KvtoolError(f"a merge budget (--merge-budget, merge.budgets) must be in (0, 1], got {b}")

    def run(self, ctx: EvalContext) -> dict[str, Any] | None:
        plan_merge = ctx.plan_merge
        budgets = list(self.budgets or ([plan_merge.budget] if plan_merge and plan_merge.budget else []))
        if not budgets:
            return None
        ctx.log(f"KV merging vs eviction at budget {', '.join(map(str, budgets))} (passkey at {self.length}, "
                "long-context perplexity)")
        return compare_merging(ctx.v, budgets, self.methods or None, passkey_length=self.length,
                               passkey_depths=even_depths(self.depths), ppl_samples=self.ppl_samples,
                               ppl_context=max(32, self.length * 3 // 4), ppl_new=max(8, self.length // 4),
                               data=ctx.data, plan_merge=plan_merge, log=ctx.log)

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        from rich.table import Table

        mr = result
        t = Table(title=f"Prompt-KV merge methods (passkey @ {mr['passkey_length']} tokens, "
                        f"{len(mr['passkey_depths'])} depths; perplexity of {mr['ppl_new']} tokens after a "
                        f"{mr['ppl_context']}-token context)", title_justify="left")
        for c in ("model", "method", "budget", "KV after prefill / base", "passkey", "long-context ppl"):
            t.add_column(c, justify="left" if c in ("model", "method") else "right")
        for r in mr["rows"]:
            method = r["method"] + (", calibrated budgets" if r.get("layer_budgets") == "calibrated" else "")
            t.add_row(r["variant"], method, "-" if r["budget"] is None else f"{r['budget']:g}",
                      f"{r['kv_ratio']:.3f}", f"{r['passkey']:.2f}", f"{r['ppl']:.2f}")
        return t
