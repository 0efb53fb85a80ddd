"""Eval task ``engine`` (``kvtool eval EXPORT --engine vllm``): the export and its base served by vLLM side by side
at the same KV-cache memory, each engine in a fresh process of the vLLM environment (``kvtool.io.vllm_env``).

It reports what the engine allocated (KV blocks, tokens, maximum concurrency), generated tokens/s for a batch of
concurrent requests that fills the base's capacity and one that fills the shared model's, held-out perplexity
through the engine (``prompt_logprobs``) beside ``kvtool.load``'s on the same tokens, with the largest per-token
log-probability gap, greedy tokens against ``kvtool.load``'s, and the same capacity and perplexity with each
quantized KV-cache dtype asked for. Two figures are checked, not just printed: the engine's block ratio must be the
map's layers / owners within one block, and the log-probability gap must stay within ``LOGPROB_TOLERANCE``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtool.data.chat import prompt_ids
from kvtool.data.texts import eval_prompts, heldout_chunks
from kvtool.errors import KvtoolError
from kvtool.evaluation.serve import parse_size
from kvtool.evaluation.task import EvalContext, EvalTask, opt
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device
from kvtool.io.loading import resolve_model
from kvtool.io.vllm_env import EngineFailed, check_export, cpu_thread_binding, run_engine_job, vllm_python
from kvtool.progress import Log, silent

# How far |log p(engine) - log p(kvtool.load)| per held-out token may go and still count as the same model, by the
# dtype both run in: (which statistic over the tokens, its bound). float32: every token within 5e-3 nats (measured:
# 6e-5 on SmolLM2; the notes saw 3e-3 on ~1k-token prompts in chunked prefill). bfloat16 and float16 round every
# activation, in other kernels and another summation order on each side, so single tokens move by tenths of a nat
# (measured up to 0.40 on SmolLM2 in bfloat16) while the mean stays near 0.05: the bound is on the mean.
LOGPROB_TOLERANCE = {"float32": ("max", 5e-3), "bfloat16": ("mean", 0.1), "float16": ("mean", 0.05)}


@torch.no_grad()
def _token_logprobs(model, ids: torch.Tensor) -> list[list[float]]:
    """log p(token t | tokens < t) for t >= 1 of each row, as kvtool.load's model computes it."""
    x = ids.to(model_device(model))
    lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)[:, :-1]
    return lp.gather(-1, x[:, 1:, None])[..., 0].cpu().tolist()


@torch.no_grad()
def _greedy(model, tok, prompts: list[list[int]], new: int) -> list[list[int]]:
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p], device=model_device(model)), max_new_tokens=new, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        out.append(g[0, len(p):].tolist())
    return out


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def _ppl(rows: list[list[float]]) -> float:
    flat = [x for r in rows for x in r]
    return math.exp(-sum(flat) / len(flat))


def requests_that_fit(num_blocks: int, block_size: int, tokens_per_request: int) -> int:
    """Requests the engine holds at once when each keeps its prompt and continuation in whole blocks."""
    return num_blocks // math.ceil(tokens_per_request / block_size)


def engine_eval(v: Variants, export_dir: str, *, python: str, kv_memory: int, dtype: str, prompt: int = 448,
                new: int = 64, kv_cache_dtypes: tuple[str, ...] = ("auto", "fp8"), samples: int = 8,
                seq_len: int = 256, gen_prompts: int = 4, gen_new: int = 32, data: str | None = None,
                tensor_parallel_size: int = 1, log: Log | None = None) -> dict[str, Any]:
    """The ``engine`` entry of an eval report (see the module docstring); its ``checks`` say which checked figures
    hold (``evaluate`` refuses the report when one does not)."""
    say = log or silent
    info = check_export(python, export_dir)
    base_dir = resolve_model(v.base_arg)[0]
    layers, owners = info["layers"], info["owners"]
    limit = layers / owners
    max_len = prompt + new
    tok = v.tokenizer
    ids = heldout_chunks(tok, samples, min(seq_len, max_len - 1), data).input_ids  # + the 1 token generated
    gen = [prompt_ids(tok, p)[0].tolist() for p in eval_prompts()[:gen_prompts]]
    eos = {tok.eos_token_id, tok.pad_token_id} - {None}
    ref: dict[str, dict[str, Any]] = {}
    for which in ("base", "shared"):
        with v.use(which) as m:
            ref[which] = {"logprobs": _token_logprobs(m, ids), "greedy": _greedy(m, tok, gen, gen_new)}
    common = {"dtype": dtype, "kv_cache_memory_bytes": kv_memory, "max_model_len": max_len,
              "tensor_parallel_size": tensor_parallel_size}
    env = cpu_thread_binding(tensor_parallel_size)
    models = {"base": base_dir, "shared": str(export_dir)}

    def job(which: str, kv_dtype: str, **extra: Any) -> dict[str, Any]:
        say(f"vLLM: {which}, KV cache {kv_dtype}{', throughput' if 'throughput' in extra else ''}")
        return run_engine_job(python, {**common, "model": models[which], "kv_cache_dtype": kv_dtype,
                                       "prompt_logprobs": ids.tolist(), **extra}, env=env)

    runs: dict[str, dict[str, Any]] = {}
    for which in ("base", "shared"):
        runs[which] = job(which, "auto", greedy={"prompts": gen, "max_tokens": gen_new})
    fits = {w: requests_that_fit(runs[w]["num_blocks"], runs[w]["block_size"], max_len) for w in runs}
    tp = [{"batch": b, "prompt_len": prompt, "max_tokens": new} for b in sorted(set(fits.values()))]
    for which in ("base", "shared"):  # both engines at both batches, each in a fresh engine again
        runs[which]["throughput"] = job(which, "auto", prompt_logprobs=None, throughput=tp)["throughput"]
    unsupported: dict[str, str] = {}
    for kv_dtype in kv_cache_dtypes:
        if kv_dtype != "auto":
            try:
                for which in ("base", "shared"):
                    runs[f"{which}+{kv_dtype}"] = job(which, kv_dtype)
            except EngineFailed as e:  # the same model ran with the model's dtype: the engine refuses this one here
                say(f"vLLM: KV cache {kv_dtype} is not available here: {e.reason}")
                unsupported[kv_dtype] = e.reason
                runs.pop(f"base+{kv_dtype}", None)

    rows: dict[str, dict[str, Any]] = {}
    for name, r in runs.items():
        which = name.split("+")[0]
        lps = r["prompt_logprobs"]
        row = {k: r[k] for k in ("kv_cache_dtype", "block_size", "num_blocks", "kv_tokens", "max_concurrency")}
        row["requests_that_fit"] = requests_that_fit(r["num_blocks"], r["block_size"], max_len)
        row["ppl"] = _ppl(lps)
        if "+" not in name:
            gaps = [abs(a - b) for ra, rb in zip(lps, ref[which]["logprobs"], strict=True)
                    for a, b in zip(ra, rb, strict=True)]
            row.update(ppl_kvtool=_ppl(ref[which]["logprobs"]), max_logprob_gap=max(gaps),
                       mean_logprob_gap=sum(gaps) / len(gaps))
            got = [_until_eos(g, eos) for g in r["greedy"]]
            want = [_until_eos(g, eos) for g in ref[which]["greedy"]]
            row["greedy_equal"] = sum(a == b for a, b in zip(got, want, strict=True))
            row["throughput"] = r["throughput"]
        rows[name] = row
    stat, tol = LOGPROB_TOLERANCE.get(dtype, LOGPROB_TOLERANCE["float32"])
    rep = {"engine": "vllm", "vllm": runs["base"]["vllm"], "dtype": dtype, "kv_cache_memory_bytes": kv_memory,
           "max_model_len": max_len, "prompt": prompt, "new": new, "layers": layers, "owners": owners,
           "block_ratio_limit": limit, "logprob_tolerance": tol, "logprob_statistic": stat,
           "heldout_tokens": ids.shape[0] * (ids.shape[1] - 1), "greedy_prompts": len(gen), "greedy_new": gen_new,
           "rows": rows, "unsupported_kv_cache_dtypes": unsupported}
    checks = rep["checks"] = []
    for kv_dtype in ("auto", *[d for d in kv_cache_dtypes if d not in ("auto", *unsupported)]):
        sfx = "" if kv_dtype == "auto" else f"+{kv_dtype}"
        b, s = rows[f"base{sfx}"], rows[f"shared{sfx}"]
        s["block_ratio"] = s["num_blocks"] / b["num_blocks"]
        # a consumer holds no blocks: shared blocks = base blocks x layers / owners, give or take one base block
        checks.append({"name": f"block ratio ({kv_dtype})", "ok": abs(s["num_blocks"] / limit - b["num_blocks"]) < 1,
                       "detail": f"vLLM allocated {s['num_blocks']} KV blocks for the shared model and "
                                 f"{b['num_blocks']} for the base ({kv_dtype}); the map implies {limit:.3f}x the base"})
    for which in ("base", "shared"):
        gap = rows[which][f"{stat}_logprob_gap"]
        checks.append({"name": f"log-probability gap ({which})", "ok": gap <= tol,
                       "detail": f"vLLM's log-probabilities of the {which} model differ from kvtool.load's by "
                                 f"{'up to' if stat == 'max' else 'on average'} {gap:.3g} nats per token "
                                 f"(tolerance {tol:g} for the {stat} in {dtype})"})
    return rep


@dataclass
class Engine(EvalTask):
    """The export and its base served by vLLM side by side (``--engine vllm``)."""

    name: ClassVar[str] = "engine"
    help: ClassVar[str] = "vLLM side by side: KV blocks, concurrency, tokens/s, log-probabilities (an export only)"
    kv_memory: int = opt(256 * 2**20, "KV-cache bytes of each engine (per tensor-parallel worker)", parse=parse_size)
    kv_dtypes: tuple[str, ...] = opt(("auto", "fp8"), "vLLM KV-cache dtypes to compare (auto = the model's)")
    prompt: int = opt(448, "prompt tokens per throughput request", min=1)
    new: int = opt(64, "generated tokens per throughput request (prompt + new = max_model_len)", min=1)
    tensor_parallel: int = opt(1, "vLLM tensor-parallel workers", min=1)
    samples: int = opt(8, "held-out windows for the log-probabilities", min=1)
    seq_len: int = opt(256, "tokens per held-out window", min=8)
    gen_new: int = opt(32, "greedy tokens per prompt against kvtool.load", min=1)

    def check(self, ctx: EvalContext) -> None:
        if ctx.export_dir is None:
            raise KvtoolError("--engine vllm serves an export: give its directory, not --plan")
        ctx.vllm_python = vllm_python(ctx.vllm_python)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        v = ctx.v
        ctx.log(f"vLLM side by side at {self.kv_memory / 2**20:,.0f} MiB of KV cache ({self.prompt} prompt + "
                f"{self.new} new tokens per request, KV cache {', '.join(self.kv_dtypes)}, fresh engines)")
        assert ctx.vllm_python is not None
        return engine_eval(v, str(ctx.export_dir), python=ctx.vllm_python, kv_memory=self.kv_memory,
                           dtype=str(v.base.dtype).removeprefix("torch."), prompt=self.prompt, new=self.new,
                           kv_cache_dtypes=self.kv_dtypes, samples=self.samples, seq_len=self.seq_len,
                           gen_new=self.gen_new, data=ctx.data, tensor_parallel_size=self.tensor_parallel,
                           log=ctx.log)

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        return {"vllm_block_ratio": result["rows"]["shared"]["block_ratio"]}

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        from rich.table import Table

        en = result
        rows = en["rows"]
        b, s = rows["base"], rows["shared"]
        t = Table(title=f"vLLM {en['vllm']} ({en['dtype']}, {en['kv_cache_memory_bytes'] / 2**20:,.0f} MiB of KV "
                        f"cache, {en['owners']} of {en['layers']} layers hold KV: limit "
                        f"{en['block_ratio_limit']:.3f}×)", title_justify="left")
        for c in ("metric", "base", "shared", "shared/base"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        f = lambda x, d=0: f"{x:,.{d}f}"  # noqa: E731
        t.add_row(f"KV blocks ({b['block_size']} tokens)", f(b["num_blocks"]), f(s["num_blocks"]),
                  f(s["block_ratio"], 3))
        t.add_row("KV tokens", f(b["kv_tokens"]), f(s["kv_tokens"]), f(s["kv_tokens"] / b["kv_tokens"], 3))
        t.add_row(f"max concurrency @ {en['max_model_len']} tokens", f(b["max_concurrency"], 2),
                  f(s["max_concurrency"], 2), f(s["max_concurrency"] / b["max_concurrency"], 3))
        t.add_row("requests that fit", f(b["requests_that_fit"]), f(s["requests_that_fit"]),
                  f(s["requests_that_fit"] / max(1, b["requests_that_fit"]), 2))
        for tb, ts in zip(b["throughput"], s["throughput"], strict=True):
            t.add_row(f"gen tok/s, {tb['batch']} requests × {tb['max_tokens']} new", f(tb["gen_tok_s"], 1),
                      f(ts["gen_tok_s"], 1), f(ts["gen_tok_s"] / tb["gen_tok_s"], 2))
        t.add_row(f"held-out ppl, vLLM ({en['heldout_tokens']:,} tokens)", f(b["ppl"], 3), f(s["ppl"], 3),
                  f(s["ppl"] / b["ppl"], 3))
        t.add_row("held-out ppl, kvtool.load", f(b["ppl_kvtool"], 3), f(s["ppl_kvtool"], 3),
                  f(s["ppl_kvtool"] / b["ppl_kvtool"], 3))
        for stat in ("max", "mean"):
            tol = f" (tol {en['logprob_tolerance']:g})" if en["logprob_statistic"] == stat else ""
            t.add_row(f"{stat} |Δ log p| vs kvtool.load{tol}", f"{b[f'{stat}_logprob_gap']:.2e}",
                      f"{s[f'{stat}_logprob_gap']:.2e}", "")
        t.add_row(f"greedy = kvtool.load ({en['greedy_prompts']} × {en['greedy_new']} tokens)",
                  f"{b['greedy_equal']}/{en['greedy_prompts']}", f"{s['greedy_equal']}/{en['greedy_prompts']}", "")
        for name in rows:
            if name.startswith("base+"):
                q = name.removeprefix("base+")
                bq, sq = rows[name], rows[f"shared+{q}"]
                t.add_row(f"KV {q}: blocks", f(bq["num_blocks"]), f(sq["num_blocks"]), f(sq["block_ratio"], 3))
                t.add_row(f"KV {q}: held-out ppl", f(bq["ppl"], 3), f(sq["ppl"], 3), f(sq["ppl"] / bq["ppl"], 3))
        return t

    @staticmethod
    def notes(result: dict[str, Any]) -> list[str]:
        """One line per KV cache dtype the engine refused on this machine, with the engine's own reason."""
        return [f"KV {q}: not available on this machine: {reason}"
                for q, reason in result.get("unsupported_kv_cache_dtypes", {}).items()]
