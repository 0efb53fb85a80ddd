"""Memory and speed of one model variant, measured in a fresh process (so peak RSS belongs to that variant alone).

    python -m kvtool.evaluation.probe --model M [--plan P] --batch B --prompt T --new N [--merge JSON|off]
        [--device D] [--dtype X]
prints one JSON line: KV-cache bytes after prefill and after decode (each checked against the map), prefill s,
decode tokens/s, generated tokens/s (prefill included), peak RSS / GPU MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.kv_check import check_layer_bytes, kv_bytes, layer_bytes
from kvtool.io.loading import load


def _status_kib(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak covers inference only, not loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def measure(model, batch: int, prompt: int, new: int, seed: int = 0) -> dict:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model(ids[:, : min(32, prompt)], logits_to_keep=1, **cache_kwargs(model, DynamicCache(config=model.config)))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import gc

    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    cache = DynamicCache(config=model.config)
    sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    sync()
    prefill = time.perf_counter() - t0
    check_layer_bytes(model, layer_bytes(cache), prompt, batch=batch)
    after_prefill = kv_bytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        nxt = model(nxt, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    sync()
    decode = time.perf_counter() - t0
    check_layer_bytes(model, layer_bytes(cache), prompt, new, batch=batch)
    res = {"kv_bytes_prefill": after_prefill, "kv_bytes": kv_bytes(cache), "prefill_s": prefill, "decode_s": decode,
           "prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * new / max(decode, 1e-9),
           "gen_tok_s": batch * new / (prefill + decode),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    hwm = _status_kib("VmHWM")
    if reset and hwm is not None and rss_before is not None:
        # peak resident memory during prefill + decode, above what the loaded model already held
        res["peak_rss_mib"] = hwm / 1024
        res["inference_rss_mib"] = (hwm - rss_before) / 1024
    if dev.type == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--plan")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--merge", help="prompt-KV merging: a merge method's JSON (MergeMethod.to_dict()), or 'off'")
    a = ap.parse_args()
    torch.manual_seed(0)
    merge = None if a.merge is None else False if a.merge == "off" else json.loads(a.merge)
    model, _ = load(a.model, plan=a.plan, dtype=a.dtype, device=a.device, merge=merge)
    print(json.dumps(measure(model, a.batch, a.prompt, a.new)))


if __name__ == "__main__":
    main()
