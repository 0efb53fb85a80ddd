"""Serving capacity of a Llama-shaped model with and without 30% cross-layer KV sharing, side by side in one run.

Builds a random-weight Llama-family model from a preset config (no download; quality is irrelevant here), measures
the unshared "base" model, then applies a fixed 30% "adjacent" sharing map (``layout_plan`` + ``apply_sharing``:
consumer layers read the layer below and store no K/V) and measures the same things again:

1. KV bytes per sequence: prefill ``--prompt`` tokens at batch 1 and decode ``--new`` tokens into a
   ``DynamicCache``; the bytes of every K/V tensor it then holds (checked layer by layer against the map).
2. Max batch in a fixed KV budget (``--kv-budget``): floor(budget / bytes per sequence), confirmed by running
   prefill + decode at that batch and checking the cache's measured bytes are within the budget.
3. Prefill time at ``--batch`` (warm-up first, CUDA synchronised), median of ``--repeats``.
4. Decode tokens/s (greedy argmax loop of ``--new`` steps) at the equal batch ``--batch`` and at each variant's
   max batch from (2); base and shared runs alternate, median of ``--repeats``.
5. Optionally on CUDA (``--gpu-memory-fraction F``): the max batch that really runs (prefill + decode) within F of
   the GPU memory left free after loading the weights (the shared model with its consumers' K/V weights dropped),
   starting from an estimate and stepping down on out-of-memory.

It prints one table per preset with shared/base ratios (KV bytes ~0.70, max batch ~L/owners ~1.43, decode tokens/s
at equal and at max batch, prefill time) and writes everything as JSON with ``--json PATH``.

On one GPU (bf16; `--preset` may be repeated, each preset is built, measured base then shared, and freed):

    python bench/gpu_serving.py --preset llama-1b --preset llama-3b --preset llama-8b --prompt 1024 --new 64 \\
        --batch 8 --kv-budget 8GiB --repeats 3 --gpu-memory-fraction 0.9 --device cuda --json gpu_serving.json

An 8 GiB KV budget at 1024 + 64 tokens holds about 240 / 60 base sequences for the 1B / 8B shapes (bf16), so the
max-batch runs stay far below 80 GB; ``--gpu-memory-fraction`` caps the allocator, so its search cannot take more.

On CPU, a few seconds:

    python bench/gpu_serving.py --preset tiny --prompt 64 --new 8 --batch 2 --kv-budget 4MiB --repeats 1 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from common import PRESETS, alternate, build_model, fmt_bytes, parse_size, ratio_spread
from transformers import DynamicCache, StaticCache

import kvtool
from kvtool.compat import cache_kwargs
from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.kv_check import check_kv_in_effect, check_layer_bytes, layer_bytes
from kvtool.crosslayer.runtime import apply_sharing, remove_sharing
from kvtool.formats.plan import SharingPlan
from kvtool.search.layouts import layout_plan

__all__ = ["PRESETS", "main", "parse_size"]
VARIANTS = ("base", "shared")


def machine(device: torch.device) -> dict[str, str]:
    """Where the numbers were measured."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "transformers": transformers.__version__, "kvtool": kvtool.__version__, "python": platform.python_version()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return freed GPU memory to the device, so that the next measurement starts clean (a no-op on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def set_variant(model: torch.nn.Module, variant: str, plan: SharingPlan, drop_unused: bool = False) -> float:
    """Run ``model`` unshared ("base") or under ``plan`` ("shared"); returns the share of the base KV its cache
    really holds (``check_kv_in_effect`` raises if that is not what the plan implies)."""
    remove_sharing(model)
    if variant == "shared":
        apply_sharing(model, plan, drop_unused=drop_unused)
    return check_kv_in_effect(model)


def prompt_ids(batch: int, prompt: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)


@torch.no_grad()
def run(model: torch.nn.Module, batch: int, prompt: int, new: int, cache_kind: str = "dynamic") -> dict[str, float]:
    """One prefill of ``batch`` x ``prompt`` tokens and ``new`` greedy decode steps over a fresh ``DynamicCache``
    (grown by concatenation at every step) or ``StaticCache`` (allocated once for prompt + new entries); the cache's
    bytes are checked per layer against the active map."""
    dev = next(model.parameters()).device
    ids = prompt_ids(batch, prompt, model.config.vocab_size, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if cache_kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=prompt + new)
    else:
        cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    sync(dev)
    t0 = time.perf_counter()
    nxt = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
    sync(dev)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new):
        nxt = model(nxt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
    sync(dev)
    decode = time.perf_counter() - t0
    got = layer_bytes(cache)
    check_layer_bytes(model, got, prompt, new, batch=batch)
    res = {"batch": batch, "prefill_s": prefill, "decode_s": decode, "decode_tok_s": batch * new / max(decode, 1e-9),
           "kv_bytes": sum(got)}
    if dev.type == "cuda":
        res["peak_extra_bytes"] = torch.cuda.max_memory_allocated(dev) - before
    del cache, kw, nxt, ids
    return res


def try_run(model: torch.nn.Module, batch: int, prompt: int, new: int, cache_kind: str = "dynamic"
            ) -> dict[str, float] | None:
    """``run``, or None if it ran out of GPU memory."""
    try:
        return run(model, batch, prompt, new, cache_kind)
    except torch.OutOfMemoryError:
        pass
    free_memory(next(model.parameters()).device)
    return None


def gpu_max_batch(model: torch.nn.Module, fraction: float, per_seq_estimate: float, prompt: int,
                  new: int, cache_kind: str = "dynamic") -> dict[str, Any]:
    """The largest batch (from an estimate, stepping down 10% on out-of-memory) whose prefill + decode runs within
    ``fraction`` of the GPU memory free now; the cap is enforced by the caching allocator."""
    dev = next(model.parameters()).device
    free_memory(dev)
    free, total = torch.cuda.mem_get_info(dev)
    allowed = fraction * free
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(dev) + allowed) / total), dev)
    tries = []
    batch = max(1, int(allowed // per_seq_estimate))
    try:
        for _ in range(12):
            res = try_run(model, batch, prompt, new, cache_kind)
            tries.append({"batch": batch, "fits": res is not None})
            print(f"    gpu max batch: batch {batch} {'fits' if res else 'out of memory'}", flush=True)
            if res is not None or batch == 1:
                break
            batch = max(1, int(batch * 0.9))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        free_memory(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weight_bytes": weights, "free_bytes": free, "allowed_bytes": allowed, "tries": tries, "result": res}


def bench_preset(preset: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every measurement for one preset, base and shared, on one model."""
    t_start = time.perf_counter()
    model = build_model(preset, device, dtype, a.prompt + a.new)
    L = model.config.num_hidden_layers
    plan = layout_plan("adjacent", layer_types(model.config), round(a.share * L))
    n_cons = len(plan.consumers)
    print(f"\n== {preset}: {L} layers, {n_cons} consumers {plan.consumers}, {dtype}, prompt {a.prompt} + "
          f"{a.new} new ==", flush=True)

    # 1. KV bytes per sequence, and 2. the max batch that fits the KV budget
    kv_share, per_seq, max_batch = {}, {}, {}
    for v in VARIANTS:
        kv_share[v] = set_variant(model, v, plan)
        per_seq[v] = run(model, 1, a.prompt, a.new, a.cache)["kv_bytes"]
        max_batch[v] = a.kv_budget // per_seq[v]
        if max_batch[v] < 1:
            raise SystemExit(f"--kv-budget {fmt_bytes(a.kv_budget)} holds no {v} sequence "
                             f"({fmt_bytes(per_seq[v])} each)")

    # 3. and 4. timings at the equal batch and at each variant's max batch: warm-up, then alternate base/shared
    batches = {v: {"eq": a.batch, "max": max_batch[v]} for v in VARIANTS}
    for v in VARIANTS:
        set_variant(model, v, plan)
        for b in batches[v].values():
            try_run(model, b, a.prompt, a.new, a.cache)

    def one_round(v: str, m: torch.nn.Module = model) -> dict[str, dict | None]:
        set_variant(m, v, plan)
        got = {}
        for kind, b in batches[v].items():
            got[kind] = res = try_run(m, b, a.prompt, a.new, a.cache)
            if res is None:
                print(f"  {v:6s} batch {b}: out of memory", flush=True)
                continue
            print(f"  {v:6s} batch {b:4d}  prefill {res['prefill_s']:.4f} s  decode "
                  f"{res['decode_tok_s']:.1f} tok/s  KV {fmt_bytes(res['kv_bytes'])}", flush=True)
        return got

    rounds = alternate(one_round, VARIANTS, a.repeats)
    runs = {v: {kind: [x[kind] for x in rs if x[kind] is not None] for kind in ("eq", "max")}
            for v, rs in rounds.items()}

    def med(v: str, kind: str, key: str) -> float | None:
        xs = [x[key] for x in runs[v][kind]]
        return statistics.median(xs) if xs else None

    out: dict[str, Any] = {"preset": preset, "config": PRESETS[preset], "layers": L, "consumers": plan.consumers,
                           "kv_source_layers": plan.kv_source_layers, "kv_budget_bytes": a.kv_budget}
    for v in VARIANTS:
        max_kv = [x["kv_bytes"] for x in runs[v]["max"]]
        if any(x > a.kv_budget or x != max_batch[v] * per_seq[v] for x in max_kv):
            raise AssertionError(f"{v}: cache at batch {max_batch[v]} holds {max_kv}, budget {a.kv_budget}")
        peaks = [x["peak_extra_bytes"] for x in runs[v]["max"] if "peak_extra_bytes" in x]
        out[v] = {"kv_share_checked": kv_share[v], "kv_bytes_per_seq": per_seq[v], "max_batch": max_batch[v],
                  "max_batch_kv_bytes": max_kv[0] if max_kv else None, "max_batch_ran": bool(max_kv),
                  "prefill_s": med(v, "eq", "prefill_s"), "decode_tok_s": med(v, "eq", "decode_tok_s"),
                  "max_batch_prefill_s": med(v, "max", "prefill_s"),
                  "max_batch_decode_tok_s": med(v, "max", "decode_tok_s"),
                  "max_batch_peak_extra_bytes": max(peaks) if peaks else None}

    # 5. max batch by real free GPU memory: base first, then shared with its consumers' K/V weights dropped
    if device.type == "cuda" and a.gpu_memory_fraction > 0:
        for v in VARIANTS:
            set_variant(model, v, plan, drop_unused=True)
            o = out[v]
            est = (o["max_batch_peak_extra_bytes"] or 2 * a.kv_budget) / max_batch[v]
            g = gpu_max_batch(model, a.gpu_memory_fraction, est, a.prompt, a.new, a.cache)
            res = g.pop("result")
            o["gpu"] = {**g, "max_batch": res["batch"] if res else None,
                        "decode_tok_s": res["decode_tok_s"] if res else None,
                        "kv_bytes": res["kv_bytes"] if res else None,
                        "peak_extra_bytes": res.get("peak_extra_bytes") if res else None}

    def ratio(key: str, sub: str | None = None) -> float | None:
        b, s = (out[v].get(sub, {}) if sub else out[v] for v in VARIANTS)
        return s[key] / b[key] if b.get(key) and s.get(key) is not None else None

    out["ratios"] = {"kv_bytes_per_seq": ratio("kv_bytes_per_seq"), "max_batch": ratio("max_batch"),
                     "limit_layers_over_owners": L / (L - n_cons), "prefill_s": ratio("prefill_s"),
                     "decode_tok_s_equal_batch": ratio("decode_tok_s"),
                     "decode_tok_s_max_batch": ratio("max_batch_decode_tok_s"),
                     "gpu_max_batch": ratio("max_batch", "gpu"), "gpu_decode_tok_s": ratio("decode_tok_s", "gpu")}
    out["ratio_spreads"] = {}  # per-round shared/base ratios: how far one round's pair is from another's
    for kind, key, name in (("eq", "prefill_s", "prefill_s"), ("eq", "decode_tok_s", "decode_tok_s_equal_batch"),
                            ("max", "decode_tok_s", "decode_tok_s_max_batch")):
        pairs = [(b[kind], s[kind]) for b, s in zip(rounds["base"], rounds["shared"], strict=True)
                 if b[kind] is not None and s[kind] is not None]
        if pairs:
            out["ratio_spreads"][name] = ratio_spread([b[key] for b, _ in pairs], [s[key] for _, s in pairs]).to_dict()
    out["seconds"] = time.perf_counter() - t_start
    del model
    free_memory(device)
    print_table(out, a)
    return out


def print_table(out: dict[str, Any], a: argparse.Namespace) -> None:
    b, s, r = out["base"], out["shared"], out["ratios"]

    def num(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    def kv(x: int | None) -> str:
        return "-" if x is None else fmt_bytes(x)

    def rng(name: str) -> str:
        sp = out.get("ratio_spreads", {}).get(name)
        return f"  (rounds {sp['min']:.3f}–{sp['max']:.3f})" if sp and sp["n"] > 1 else ""

    rows = [
        ("KV bytes per sequence", fmt_bytes(b["kv_bytes_per_seq"]), fmt_bytes(s["kv_bytes_per_seq"]),
         num(r["kv_bytes_per_seq"], ".4f")),
        (f"max batch in {fmt_bytes(a.kv_budget)} KV", str(b["max_batch"]), str(s["max_batch"]),
         num(r["max_batch"], ".3f") + f"  (limit {r['limit_layers_over_owners']:.3f})"),
        ("  KV measured at max batch", kv(b["max_batch_kv_bytes"]), kv(s["max_batch_kv_bytes"]), ""),
        (f"prefill s (batch {a.batch})", num(b["prefill_s"], ".4f"), num(s["prefill_s"], ".4f"),
         num(r["prefill_s"], ".3f") + rng("prefill_s")),
        (f"decode tok/s (batch {a.batch})", num(b["decode_tok_s"], ".1f"), num(s["decode_tok_s"], ".1f"),
         num(r["decode_tok_s_equal_batch"], ".3f") + rng("decode_tok_s_equal_batch")),
        ("decode tok/s (max batch)", num(b["max_batch_decode_tok_s"], ".1f"), num(s["max_batch_decode_tok_s"], ".1f"),
         num(r["decode_tok_s_max_batch"], ".3f") + rng("decode_tok_s_max_batch")),
        ("prefill s (max batch)", num(b["max_batch_prefill_s"], ".4f"), num(s["max_batch_prefill_s"], ".4f"), ""),
    ]
    if "gpu" in b:
        rows += [
            (f"max batch in {a.gpu_memory_fraction:.0%} free GPU mem", num(b["gpu"]["max_batch"], "d"),
             num(s["gpu"]["max_batch"], "d"), num(r["gpu_max_batch"], ".3f")),
            ("decode tok/s (GPU max batch)", num(b["gpu"]["decode_tok_s"], ".1f"), num(s["gpu"]["decode_tok_s"], ".1f"),
             num(r["gpu_decode_tok_s"], ".3f")),
        ]
    print(f"\n{out['preset']}: {len(out['consumers'])}/{out['layers']} consumer layers, prompt {a.prompt} + {a.new} "
          f"new tokens, median of {a.repeats}, {out['seconds']:.0f} s")
    print(f"{'':34s} {'base':>12s} {'shared':>12s}  shared/base")
    for name, x, y, z in rows:
        print(f"{name:34s} {x:>12s} {y:>12s}  {z}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="model shape; repeat to run several (default: llama-1b on cuda, tiny on cpu)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="the equal batch for prefill and decode timings")
    ap.add_argument("--kv-budget", type=parse_size, default=parse_size("8GiB"), help="KV memory budget, e.g. 8GiB")
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.0,
                    help="CUDA: also find the max batch within this fraction of free GPU memory (0: skip)")
    ap.add_argument("--share", type=float, default=0.3, help="share of layers that become consumers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="DynamicCache (grows by concatenation) or StaticCache (allocated once, as servers do)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device)
    if a.device.type == "cuda" and a.device.index is None:
        a.device = torch.device("cuda", torch.cuda.current_device())
    a.preset = a.preset or (["llama-1b"] if a.device.type == "cuda" else ["tiny"])
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.type == "cuda" else "float32"))
    if min(a.prompt, a.new, a.batch, a.repeats) < 1 or not 0 < a.share < 1:
        ap.error("--prompt, --new, --batch, --repeats must be >= 1 and --share in (0, 1)")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    info = machine(a.device)
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    settings = {k: (str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v) for k, v in vars(a).items()}
    report: dict[str, Any] = {"machine": info, "settings": settings, "presets": []}
    for preset in a.preset:
        report["presets"].append(bench_preset(preset, a, a.device, a.dtype))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {a.json}")
    return report


if __name__ == "__main__":
    main()
