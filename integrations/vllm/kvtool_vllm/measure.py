"""One vLLM engine, one job: ``python -m kvtool_vllm.measure JOB.json OUT.json``.

Starts ``LLM(model=...)`` at a fixed KV-cache memory and reports what the engine allocated (blocks, tokens, maximum
concurrency), then whatever the job asks: greedy tokens of prompts, per-token log-probabilities of given token ids
(``prompt_logprobs``), and generated tokens/s for batches of concurrent requests. ``kvtool eval --engine vllm`` and
the plugin's tests run one such process per engine, so each engine starts fresh. Failures are one line in
``{"error": ...}`` and exit status 2.

Job keys: model, dtype, kv_cache_memory_bytes, max_model_len, kv_cache_dtype ("auto"), tensor_parallel_size (1),
greedy {prompts: [[ids]] | [str], max_tokens}, prompt_logprobs [[ids]], throughput [{batch, prompt_len,
max_tokens}], seed (0)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _prompt(p: Any) -> Any:
    return {"prompt_token_ids": list(p)} if isinstance(p, list) else p


def run(job: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"),
              kv_cache_memory_bytes=int(job["kv_cache_memory_bytes"]), max_model_len=int(job["max_model_len"]),
              kv_cache_dtype=job.get("kv_cache_dtype", "auto"),
              tensor_parallel_size=int(job.get("tensor_parallel_size", 1)), enforce_eager=True,
              seed=int(job.get("seed", 0)), max_num_seqs=int(job.get("max_num_seqs", 256)))
    cc = llm.llm_engine.vllm_config.cache_config
    res: dict[str, Any] = {
        "vllm": vllm.__version__, "model": job["model"], "dtype": str(llm.llm_engine.vllm_config.model_config.dtype),
        "kv_cache_dtype": cc.cache_dtype, "kv_cache_memory_bytes": int(job["kv_cache_memory_bytes"]),
        "block_size": cc.block_size, "num_blocks": cc.num_gpu_blocks,
        "kv_tokens": getattr(cc, "kv_cache_size_tokens", None), "max_concurrency":
            getattr(cc, "kv_cache_max_concurrency", None), "max_model_len": int(job["max_model_len"]),
    }
    if res["kv_tokens"] is None:  # the engine ran in another process: one KV cache group of uniform layers
        res["kv_tokens"] = cc.num_gpu_blocks * cc.block_size
        res["max_concurrency"] = res["kv_tokens"] / res["max_model_len"]
    if job.get("greedy"):
        g = job["greedy"]
        outs = llm.generate([_prompt(p) for p in g["prompts"]],
                            SamplingParams(max_tokens=int(g["max_tokens"]), temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
        res["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
        res["greedy_text"] = [o.outputs[0].text for o in outs]
    if job.get("prompt_logprobs"):
        outs = llm.generate([_prompt(p) for p in job["prompt_logprobs"]],
                            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        res["prompt_logprobs"] = [
            [lp[tok].logprob for tok, lp in zip(ids[1:], o.prompt_logprobs[1:], strict=True)]
            for ids, o in zip(job["prompt_logprobs"], outs, strict=True)]
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    for t in job.get("throughput") or []:  # distinct synthetic prompts (no prefix is shared between requests)
        prompts = [[(7 * i + 13 * k + i * k) % (vocab - 10) + 5 for k in range(int(t["prompt_len"]))]
                   for i in range(int(t["batch"]))]
        params = SamplingParams(max_tokens=int(t["max_tokens"]), temperature=0.0, ignore_eos=True)
        llm.generate([_prompt(prompts[0])], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm
        t0 = time.perf_counter()
        outs = llm.generate([_prompt(p) for p in prompts], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        res.setdefault("throughput", []).append({**t, "seconds": dt, "generated": gen, "gen_tok_s": gen / dt})
    llm.llm_engine.engine_core.shutdown()  # workers stop here, not in interpreter teardown
    return res


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kvtool_vllm.measure JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if int(job.get("tensor_parallel_size", 1)) == 1
                          else "1")
    try:
        res, code = run(job), 0
    except Exception as e:  # noqa: BLE001 - reported as one line to the caller, which decides
        from kvtool_vllm.export_map import KvtoolVllmError

        cause = e
        while not isinstance(cause, KvtoolVllmError) and cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        res, code = {"error": msg, "error_type": type(cause).__name__}, 2
    tmp = Path(args[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, args[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the engine is shut down; a multi-process engine's late teardown has aborted the exit status


if __name__ == "__main__":
    sys.exit(main())
