"""A training-free repair that was tried for issue 8 and did not help (kept so the negative result reproduces).

For each consumer j reading owner i, fit on base-model activations of the calibration text:
- keys: per KV head and RoPE frequency pair, one complex scale c with k_j ≈ c·k_i (pre-RoPE). A complex scale
  commutes with the RoPE rotation, so it folds exactly into the consumer's q_proj rows as conj(c);
- values: per KV head, a least-squares matrix B with v_j ≈ B v_i, folded into the consumer's o_proj columns.
Then print the calibration cosine / next-token KL of the plan before and after (no held-out text is used).

    python bench/closed_form_align.py --calib DIR --plan plan.json --mode k|v|kv
"""

from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--mode", default="kv", choices=["k", "v", "kv"])
    ap.add_argument("--samples", type=int, default=64)
    a = ap.parse_args()
    import kvtool
    from kvtool.crosslayer.archs import decoder_layers, kv_dims
    from kvtool.data.texts import load_chunks
    from kvtool.formats.stats import CalibrationStats
    from kvtool.search.compare import calibration_metrics

    plan = kvtool.SharingPlan.load(a.plan)
    stats = CalibrationStats.load(a.calib)
    model, tok = kvtool.load()
    print("before (cosine, KL):", calibration_metrics(model, stats, plan), flush=True)
    nkv, hd = kv_dims(model.config)
    group = model.config.num_attention_heads // nkv
    half = hd // 2
    layers = decoder_layers(model)
    ks: dict[int, list] = {i: [] for i in range(len(layers))}
    vs: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = []
    for n, layer in enumerate(layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(
            lambda m, i, o, n=n: ks[n].append(o.reshape(-1, nkv, hd).double())))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, i, o, n=n: vs[n].append(o.reshape(-1, nkv, hd).double())))
    ids = load_chunks(None, tok, a.samples, 128, seed=17).input_ids
    for s in range(0, ids.shape[0], 8):
        model.model(input_ids=ids[s : s + 8], use_cache=False)
    for h in hooks:
        h.remove()
    K = {n: torch.cat(x) for n, x in ks.items()}
    V = {n: torch.cat(x) for n, x in vs.items()}
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
    print(f"after {a.mode} alignment (cosine, KL):", calibration_metrics(model, stats, plan), flush=True)


if __name__ == "__main__":
    main()
