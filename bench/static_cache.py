"""Dynamic vs static KV cache under a sharing plan, side by side in one process (base and shared, alternating).

A ``DynamicCache`` grows each owner layer's K/V with ``torch.cat`` at every decoded token, copying the whole cache;
a ``StaticCache`` (``generate(..., cache_implementation="static")``) allocates ``max_len`` entries per owner layer
once and writes one entry per step. Under a plan, consumer layers get no cache slot in either (``DummyLayer``), so the
static cache's allocation is the owners' share exactly. Reports allocated KV bytes, decode tokens/s of each cache,
and with ``--compile`` the static decode step under ``torch.compile`` (checked against the eager one).

    python bench/static_cache.py [--model DIR | --preset llama-1b] [--plan plan.json] [--batch 4] [--prompt 512]
                                 [--new 64] [--repeats 3] [--compile] [--device cuda] [--json out.json]

Without ``--plan`` a 30% adjacent-pairs layout is used (it measures memory and speed, not quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import alternate, build_model, ratio_spread, spread


def decode_run(model, ids, new: int, cache, step) -> tuple[float, object]:
    """Prefill ``ids`` into ``cache``, then ``new`` greedy steps through ``step``; returns (decode seconds, tokens)."""
    import torch

    from kvtool.compat import cache_kwargs

    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        logits = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits
        nxt = logits[:, -1:].argmax(-1)
        toks = [nxt]
        pos = ids.shape[1]
        sync()
        t0 = time.perf_counter()
        for _ in range(new):
            cp = torch.tensor([pos], device=ids.device)
            nxt = step(nxt, cache, cp).logits[:, -1:].argmax(-1)
            toks.append(nxt)
            pos += 1
        sync()
    return time.perf_counter() - t0, torch.cat(toks, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", help="a random-weight model of bench/common.py's PRESETS instead of --model")
    ap.add_argument("--plan")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the static decode step under torch.compile")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch
    from transformers import DynamicCache, StaticCache

    import kvtool
    from kvtool.compat import cache_kwargs
    from kvtool.crosslayer.archs import layer_types
    from kvtool.crosslayer.kv_check import entry_bytes, layer_bytes
    from kvtool.crosslayer.runtime import sharing
    from kvtool.search.layouts import layout_plan

    if a.preset:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(a.preset, device, dtype, a.prompt + a.new + 8)
    else:
        model, _ = kvtool.load(a.model, dtype=a.dtype, device=a.device)
    L = model.config.num_hidden_layers
    plan = kvtool.SharingPlan.load(a.plan) if a.plan else layout_plan("adjacent", layer_types(model.config),
                                                                     round(0.3 * L))
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (a.batch, a.prompt), generator=g).to(dev)
    max_len = a.prompt + a.new + 1

    def eager_step(tok, cache, cp):
        return model(tok, use_cache=True, cache_position=cp, **cache_kwargs(model, cache))

    compiled = torch.compile(eager_step, dynamic=False) if a.compile else None
    cases = [("dynamic", lambda: DynamicCache(config=model.config), eager_step),
             ("static", lambda: StaticCache(config=model.config, max_cache_len=max_len), eager_step)]
    if compiled is not None:
        cases.append(("static+compile", lambda: StaticCache(config=model.config, max_cache_len=max_len), compiled))
    def one_round(variant: str) -> dict[str, tuple[float, object, int]]:
        """Each cache once under ``variant``: (decode seconds, greedy tokens, allocated KV bytes)."""
        with sharing(model, plan) if variant == "shared" else torch.no_grad():
            got = {}
            for name, make, step in cases:
                cache = make()
                secs, toks = decode_run(model, ids, a.new, cache, step)
                got[name] = (secs, toks, sum(layer_bytes(cache)))
            return got

    rounds = alternate(one_round, ("base", "shared"), a.repeats, warmup=1)  # the warm-up round also compiles
    times = {f"{v}/{name}": [x[name][0] for x in rs] for v, rs in rounds.items() for name, _, _ in cases}
    tokens = {f"{v}/{name}": rs[0][name][1] for v, rs in rounds.items() for name, _, _ in cases}
    alloc = {v: rs[0]["static"][2] for v, rs in rounds.items()}
    agree = {}  # every cache (and compile) decodes the same greedy tokens; bf16 kernels may round differently
    for variant in ("base", "shared"):
        ref = tokens[f"{variant}/dynamic"]
        for name, _, _ in cases[1:]:
            agree[f"{variant}/{name}"] = float((tokens[f"{variant}/{name}"] == ref).float().mean())
            if next(model.parameters()).dtype == torch.float32:
                assert agree[f"{variant}/{name}"] == 1.0, f"{variant}/{name} decodes other tokens"
    owners = L - len(plan.consumers)
    assert alloc["base"] == L * max_len * entry_bytes(model, a.batch), "static cache allocation differs from L x len"
    assert alloc["shared"] == owners * max_len * entry_bytes(model, a.batch), "static cache holds consumer slots"
    tok_s = {k: a.batch * a.new / statistics.median(v) for k, v in times.items()}
    # shared/base decode speed: ratio of the medians, and the range of the rounds' ratios (paired by round)
    ratios = {name: ratio_spread(times[f"shared/{name}"], times[f"base/{name}"]) for name, _, _ in cases}
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "layers": L,
              "consumers": len(plan.consumers), "batch": a.batch, "prompt": a.prompt, "new": a.new,
              "static_alloc_bytes": alloc, "decode_tok_s": tok_s,
              "decode_s": {k: spread(v).to_dict() for k, v in times.items()},
              "decode_shared_over_base": {k: r.to_dict() for k, r in ratios.items()},
              "token_agreement_with_dynamic": agree,
              "repeats": a.repeats}
    print(f"{report['device']}: {len(plan.consumers)}/{L} layers shared, batch {a.batch}, {a.prompt} prompt + "
          f"{a.new} new tokens, median of {a.repeats}")
    print(f"static cache allocated: base {alloc['base'] / 2**20:.1f} MiB, shared {alloc['shared'] / 2**20:.1f} MiB "
          f"(ratio {alloc['shared'] / alloc['base']:.4f} = {owners}/{L})")
    print(f"{'decode tokens/s':<18}{'base':>10}{'shared':>10}{'shared/base':>13}")
    for name, _, _ in cases:
        b, s = tok_s[f"base/{name}"], tok_s[f"shared/{name}"]
        r = ratios[name]
        print(f"{name:<18}{b:>10.1f}{s:>10.1f}{s / b:>13.3f}" +
              (f"  (rounds {r.low:.3f}–{r.high:.3f})" if r.n > 1 else ""))
    for variant in ("base", "shared"):
        ratio = tok_s[f"{variant}/static"] / tok_s[f"{variant}/dynamic"]
        print(f"{variant}: static / dynamic decode speed {ratio:.3f}")
    print("greedy tokens equal to the dynamic cache's:", {k: round(v, 3) for k, v in agree.items()})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
