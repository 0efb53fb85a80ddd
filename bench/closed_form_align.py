"""Training-free repairs that were tried (issues 8 and 24) and helped little or not at all (kept so the results
reproduce).

For each consumer j reading owner i, fit on activations of the calibration text:
- ``k``: per KV head and RoPE frequency pair, one complex scale c with k_j ≈ c·k_i (pre-RoPE, base model). A
  complex scale commutes with the RoPE rotation, so it folds exactly into the consumer's q_proj rows as conj(c);
- ``v``: per KV head, a least-squares matrix B with v_j ≈ B v_i (base model), folded into the consumer's o_proj
  columns;
- ``oproj``: the consumer's o_proj refitted, by ridge regression toward its own weights, so that its output on the
  attention it actually computes under sharing (earlier consumers already refitted) matches the base model's o_proj
  output on the same text, consumer by consumer in layer order.
Then print the calibration cosine / next-token KL of the plan before and after, and the held-out perplexity (pydoc
split, 8 × 256 tokens) before and after.

    python bench/closed_form_align.py --calib DIR --plan plan.json --mode k|v|kv|oproj [--ridge 0.01]
"""

from __future__ import annotations

import argparse
import contextlib

import torch


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--mode", default="kv", choices=["k", "v", "kv", "oproj"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ridge", type=float, default=0.01, help="oproj: ridge weight, relative to the mean of diag(XᵀX)")
    a = ap.parse_args()
    import kvtool
    from kvtool.crosslayer.archs import decoder_layers, kv_dims
    from kvtool.data.texts import heldout_chunks, load_chunks
    from kvtool.formats.stats import CalibrationStats
    from kvtool.metrics import perplexity
    from kvtool.search.compare import calibration_metrics

    plan = kvtool.SharingPlan.load(a.plan)
    stats = CalibrationStats.load(a.calib)
    model, tok = kvtool.load()
    print("before (cosine, KL):", calibration_metrics(model, stats, plan), flush=True)
    held = heldout_chunks(tok).input_ids
    base_ppl, _ = perplexity(model, held)
    before = shared_perplexity(model, plan, held)
    print(f"held-out perplexity: base {base_ppl:.3f}, shared {before:.3f} ({before / base_ppl:.3f}× base)", flush=True)
    if a.mode == "oproj":
        refit_o_proj(model, plan, load_chunks(None, tok, a.samples, 256, seed=0).input_ids, a.ridge)
        report(model, stats, plan, held, base_ppl, a.mode)
        return
    nkv, hd = kv_dims(model.config)
    group = model.config.num_attention_heads // nkv
    half = hd // 2
    layers = decoder_layers(model)
    ids = load_chunks(None, tok, a.samples, 128, seed=17).input_ids
    kv = activations(model, {(n, w): getattr(layer.self_attn, f"{w}_proj") for n, layer in enumerate(layers)
                             for w in "kv"}, ids)
    K = {n: y.reshape(-1, nkv, hd) for (n, w), (_, y) in kv.items() if w == "k"}
    V = {n: y.reshape(-1, nkv, hd) for (n, w), (_, y) in kv.items() if w == "v"}
    for j, i in enumerate(plan.kv_source_layers):
        if i == j:
            continue
        attn = layers[j].self_attn
        for h in range(nkv):
            heads = range(h * group, (h + 1) * group)
            if "k" in a.mode:  # rotate_half pairs (d, d + half)
                kj, ki = K[j][:, h], K[i][:, h]
                zj, zi = torch.complex(kj[:, :half], kj[:, half:]), torch.complex(ki[:, :half], ki[:, half:])
                c = (zj * zi.conj()).sum(0) / (zi.abs() ** 2).sum(0)
                re, im = c.real.float()[:, None], c.imag.float()[:, None]
                for q in heads:
                    w = attn.q_proj.weight[q * hd : (q + 1) * hd]
                    x, y = w[:half].clone(), w[half:].clone()
                    w[:half], w[half:] = re * x + im * y, -im * x + re * y
            if "v" in a.mode:
                vj, vi = V[j][:, h], V[i][:, h]
                gram = vi.T @ vi
                gram += 1e-3 * gram.diagonal().mean() * torch.eye(hd, dtype=gram.dtype)
                b = torch.linalg.solve(gram, vi.T @ vj).T.float()  # v_j ≈ b @ v_i
                for q in heads:
                    cols = attn.o_proj.weight[:, q * hd : (q + 1) * hd]
                    cols.copy_(cols @ b)
    report(model, stats, plan, held, base_ppl, a.mode)


def shared_perplexity(model, plan, held: torch.Tensor) -> float:
    import kvtool
    from kvtool.metrics import perplexity

    with kvtool.sharing(model, plan):
        return perplexity(model, held)[0]


@torch.no_grad()
def activations(model, modules: dict, ids: torch.Tensor, plan=None, inputs: bool = False) -> dict:
    """key → (inputs or None, outputs) of each module in ``modules`` over ``ids`` (8 rows at a time), one row per
    token, in float64; under ``plan``'s sharing when given."""
    import kvtool

    xs: dict = {k: [] for k in modules}
    ys: dict = {k: [] for k in modules}

    def hook(k):
        def record(_m, inp, out):
            if inputs:
                xs[k].append(inp[0].reshape(-1, inp[0].shape[-1]).double())
            ys[k].append(out.reshape(-1, out.shape[-1]).double())
        return record

    hooks = [m.register_forward_hook(hook(k)) for k, m in modules.items()]
    try:
        with kvtool.sharing(model, plan) if plan is not None else contextlib.nullcontext():
            for s in range(0, ids.shape[0], 8):
                model.model(input_ids=ids[s : s + 8], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (torch.cat(xs[k]) if inputs else None, torch.cat(ys[k])) for k in modules}


def report(model, stats, plan, held, base_ppl: float, mode: str) -> None:
    from kvtool.search.compare import calibration_metrics

    print(f"after {mode} alignment (cosine, KL):", calibration_metrics(model, stats, plan), flush=True)
    after = shared_perplexity(model, plan, held)
    print(f"held-out perplexity after {mode}: {after:.3f} ({after / base_ppl:.3f}× base)", flush=True)


@torch.no_grad()
def refit_o_proj(model, plan, ids: torch.Tensor, ridge: float) -> None:
    """Each consumer's o_proj W ← argmin ‖X Wᵀ − Y‖² + λ‖W − W₀‖², X its inputs under sharing (earlier consumers
    refitted), Y the base's o_proj outputs on the same tokens, λ = ridge · mean(diag XᵀX)."""
    from kvtool.crosslayer.archs import decoder_layers

    layers = decoder_layers(model)
    o_proj = {j: layers[j].self_attn.o_proj for j, i in enumerate(plan.kv_source_layers) if i != j}
    target = {j: y for j, (_, y) in activations(model, o_proj, ids).items()}  # the base, before any refit
    for j, y in target.items():
        x, _ = activations(model, {j: o_proj[j]}, ids, plan, inputs=True)[j]
        w0 = o_proj[j].weight
        gram = x.T @ x
        lam = ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y + lam * w0.double().T).T
        err = [float(((x @ m.T - y) ** 2).sum() / (y**2).sum()) for m in (w0.double(), w)]
        w0.copy_(w.to(w0.dtype))
        print(f"  layer {j}: relative output error {err[0]:.4f} → {err[1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
