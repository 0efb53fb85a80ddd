"""``kvtool calibrate``: per-layer KV statistics that the search and the merger need, from one pass over data."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvtool.atomic import check_writable_dir
from kvtool.crosslayer.archs import arch_of, kv_dims, layer_types
from kvtool.crosslayer.runtime import observe
from kvtool.data.texts import load_chunks
from kvtool.errors import KvtoolError
from kvtool.formats.recipe import CalibrationSettings
from kvtool.formats.stats import (
    SIM_BINS,
    SIM_EPS,
    SIM_QUANTILES,
    STATS_VERSION,
    CalibrationStats,
    sim_fraction_above,
    sim_quantiles,
)
from kvtool.io.fingerprint import model_fingerprint
from kvtool.io.loading import model_and_tokenizer, model_origin
from kvtool.plots import distance_heatmap
from kvtool.progress import Advance
from kvtool.versions import versions


class _Collector:
    """Running sums over samples, so memory stays flat in N."""

    def __init__(self, num_layers: int, heads: int, seq_len: int, head_dim: int):
        self.k_sum = torch.zeros(num_layers, heads, seq_len, head_dim, dtype=torch.float64)
        self.v_sum = torch.zeros_like(self.k_sum)
        self.hist = torch.zeros(num_layers, heads, SIM_BINS, dtype=torch.long)
        self.n = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k = k.detach().float()
        self.k_sum[layer] += k.sum(0).double().cpu()
        self.v_sum[layer] += v.detach().float().sum(0).double().cpu()
        sim = torch.nn.functional.cosine_similarity(k[:, :, 1:], k[:, :, :-1], dim=-1)  # [B, H, T-1]
        idx = ((sim + 1) * (SIM_BINS / 2)).long().clamp_(0, SIM_BINS - 1)
        h = k.shape[1]
        offs = torch.arange(h, device=idx.device).view(1, h, 1) * SIM_BINS
        self.hist[layer] += torch.bincount((idx + offs).reshape(-1), minlength=h * SIM_BINS).view(h, SIM_BINS).cpu()


def layer_distances(k_mean: torch.Tensor, v_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """Layer x layer distances between calibration KV averages ([L, H, T, D] each).

    euclidean: the paper's, over the flattened K and V together; kvsharer: the official code's, per (head, token)
    L2 over head_dim, averaged, (d_K + d_V) / 2; cosine: 1 - cosine similarity of the flattened K and V.
    """
    L = k_mean.shape[0]
    flat = torch.cat([k_mean.reshape(L, -1), v_mean.reshape(L, -1)], 1).double()
    euclid = torch.cdist(flat, flat)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = 1 - unit @ unit.T
    kd = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        dk = (k_mean[i : i + 1] - k_mean).norm(dim=-1).mean(dim=(1, 2))
        dv = (v_mean[i : i + 1] - v_mean).norm(dim=-1).mean(dim=(1, 2))
        kd[i] = (dk + dv) / 2
    return {"euclidean": euclid.float(), "kvsharer": kd.float(), "cosine": cos.clamp_min(0).float()}


@torch.no_grad()
def collect_stats(model, input_ids: torch.Tensor, batch_size: int = 8, progress=None) -> dict[str, torch.Tensor]:
    """One forward per batch with an observer in every attention layer; returns the stats tensors."""
    cfg = model.config
    L = cfg.num_hidden_layers
    heads, head_dim = kv_dims(cfg)
    n, t = input_ids.shape
    col = _Collector(L, heads, t, head_dim)
    finals = []
    device = next(model.parameters()).device
    with observe(model, col):
        for s in range(0, n, batch_size):
            ids = input_ids[s : s + batch_size].to(device)
            out = model.model(input_ids=ids, use_cache=False)
            finals.append(out.last_hidden_state.float().cpu())
            if progress is not None:
                progress(ids.shape[0])
    k_mean = (col.k_sum / n).float()
    v_mean = (col.v_sum / n).float()
    tensors = {"k_mean": k_mean, "v_mean": v_mean, "input_ids": input_ids.cpu(),
               "final_hidden": torch.cat(finals), "keysim_hist": col.hist,
               "keysim_quantiles": sim_quantiles(col.hist),
               "keysim_frac": torch.stack([sim_fraction_above(col.hist, e) for e in SIM_EPS], -1)}
    for kind, d in layer_distances(k_mean, v_mean).items():
        tensors[f"dist_{kind}"] = d
    return tensors


def calibrate(
    model=None,
    *,
    tokenizer=None,
    settings: CalibrationSettings | None = None,
    out: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    progress: Advance | None = None,
    **fields: Any,
) -> CalibrationStats:
    """Collect per-layer KV statistics of ``model`` (a path, hub id, None for the embedded default, or a loaded model
    with its ``tokenizer``) over calibration chunks; write them to ``out`` if given. ``settings`` or keyword fields
    of ``CalibrationSettings`` (data, samples, seq_len, seed, batch_size) choose the chunks. ``progress(n)`` is
    called as chunks are done."""
    try:
        s = replace(settings or CalibrationSettings(), **fields).validated()
    except TypeError as e:
        raise KvtoolError(f"calibrate: {e}") from None
    if out is not None:
        check_writable_dir(out, force)
    t0 = time.time()
    model, tokenizer = model_and_tokenizer(model, tokenizer, dtype=dtype, device=device, what="calibrate")
    arch_of(model)
    origin = model_origin(model)
    chunks = load_chunks(s.data, tokenizer, s.samples, s.seq_len, s.seed)
    tensors = collect_stats(model, chunks.input_ids, batch_size=s.batch_size, progress=progress)
    cfg = model.config
    heads, head_dim = kv_dims(cfg)
    meta = {
        "version": STATS_VERSION,
        "model_name": origin.name,
        "model": origin.source,
        "model_fingerprint": model_fingerprint(model),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "layer_types": layer_types(cfg),
        "sliding_window": getattr(cfg, "sliding_window", None),
        "kv_heads": heads,
        "head_dim": head_dim,
        "data": chunks.source,
        "data_hash": chunks.data_hash,
        "samples": chunks.num,
        "seq_len": chunks.seq_len,
        "seed": s.seed,
        "settings": s.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "keysim_eps": list(SIM_EPS),
        "keysim_quantiles": list(SIM_QUANTILES),
        "versions": versions(),
        "wall_time_s": round(time.time() - t0, 2),
    }
    stats = CalibrationStats(tensors, meta)
    if out is not None:
        png = distance_heatmap(tensors["dist_euclidean"].numpy(),
                               title=f"{origin.name}: Euclidean distance of calibration KV averages")
        stats.save(out, force=force, extra={"distance_heatmap.png": png})
    return stats
