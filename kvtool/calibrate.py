"""``kvtool calibrate``: per-layer KV statistics that the search and the merger need, from one pass over data."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvtool.archs import kv_dims, layer_types
from kvtool.errors import KvtoolError
from kvtool.progress import progress_bar
from kvtool.runtime import observe

STATS_VERSION = 1
SIM_BINS = 400  # histogram of consecutive-key cosine similarity over [-1, 1]
SIM_EPS = (0.5, 0.75, 0.9)
SIM_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
DISTANCES = ("euclidean", "kvsharer", "cosine")


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


def sim_quantiles(hist: torch.Tensor, qs: tuple[float, ...] = SIM_QUANTILES) -> torch.Tensor:
    """Quantiles of the consecutive-key similarity from the histogram ([..., bins] -> [..., len(qs)])."""
    cdf = hist.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:].clamp_min(1)
    edges = torch.linspace(-1, 1, SIM_BINS + 1, dtype=torch.float64)[1:]
    out = [edges[torch.searchsorted(cdf, torch.full((*cdf.shape[:-1], 1), q, dtype=torch.float64)).clamp_max(
        SIM_BINS - 1)].squeeze(-1) for q in qs]
    return torch.stack(out, -1).float()


def sim_fraction_above(hist: torch.Tensor, eps: float) -> torch.Tensor:
    """Fraction of consecutive-key similarities above ``eps`` (bin resolution 2/SIM_BINS)."""
    first = int(round((eps + 1) * SIM_BINS / 2))
    return (hist[..., first:].sum(-1).double() / hist.sum(-1).clamp_min(1)).float()


@dataclass
class CalibrationStats:
    """What ``calibrate`` writes: tensors (``stats.safetensors``) plus metadata (``calibration.json``)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    def distance(self, kind: str = "euclidean") -> torch.Tensor:
        if kind not in DISTANCES:
            raise KvtoolError(f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)}")
        return self.tensors[f"dist_{kind}"]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    @property
    def final_hidden(self) -> torch.Tensor:
        return self.tensors["final_hidden"]

    def save(self, out: str | Path, force: bool = False, heatmap: bool = True) -> Path:
        from kvtool.atomic import atomic_dir

        with atomic_dir(out, force) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "stats.safetensors"))
            (tmp / "calibration.json").write_text(json.dumps(self.meta, indent=2) + "\n")
            if heatmap:
                from kvtool.plots import distance_heatmap

                distance_heatmap(self.tensors["dist_euclidean"].numpy(), tmp / "distance_heatmap.png",
                                 title=f"{self.meta['model_name']}: Euclidean distance of calibration KV averages")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        p = Path(path)
        if not (p / "calibration.json").is_file() or not (p / "stats.safetensors").is_file():
            raise KvtoolError(f"{p} is not a calibration directory (run `kvtool calibrate --out {p}` first)")
        try:
            meta = json.loads((p / "calibration.json").read_text())
            tensors = load_file(str(p / "stats.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise KvtoolError(f"{p}: calibration files are damaged ({str(e).splitlines()[0][:200]})") from e
        if meta.get("version") != STATS_VERSION:
            raise KvtoolError(f"{p}: calibration format {meta.get('version')} is not supported")
        need = {"k_mean", "v_mean", "input_ids", "final_hidden", "keysim_hist"} | {f"dist_{d}" for d in DISTANCES}
        missing = need - set(tensors)
        if missing:
            raise KvtoolError(f"{p}: stats.safetensors lacks {', '.join(sorted(missing))}")
        return cls(tensors, meta)


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
    data: str | Path | None = None,
    samples: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
) -> CalibrationStats:
    """Collect per-layer KV statistics of ``model`` over calibration chunks; write them to ``out`` if given."""
    from kvtool.atomic import check_writable_dir
    from kvtool.data import load_chunks
    from kvtool.loading import load, model_fingerprint
    from kvtool.versions import versions

    if out is not None:
        check_writable_dir(out, force)
    t0 = time.time()
    if model is None or isinstance(model, (str, Path)):
        model_arg = model
        model, tokenizer = load(model, dtype=dtype, device=device)
    else:
        model_arg = getattr(model, "kvtool_source", None)
        if tokenizer is None:
            raise KvtoolError("calibrate(model_object) needs tokenizer=")
    from kvtool.archs import arch_of

    arch_of(model)
    chunks = load_chunks(data, tokenizer, samples, seq_len, seed)
    with progress_bar(show_progress, chunks.num, "calibrating") as advance:
        tensors = collect_stats(model, chunks.input_ids, batch_size=batch_size, progress=advance)
    cfg = model.config
    heads, head_dim = kv_dims(cfg)
    meta = {
        "version": STATS_VERSION,
        "model_name": getattr(model, "kvtool_name", cfg.name_or_path),
        "model": None if model_arg is None else str(model_arg),
        "model_fingerprint": model_fingerprint(model),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "layer_types": layer_types(cfg),
        "kv_heads": heads,
        "head_dim": head_dim,
        "data": chunks.source,
        "data_hash": chunks.data_hash,
        "samples": chunks.num,
        "seq_len": chunks.seq_len,
        "seed": seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "keysim_eps": list(SIM_EPS),
        "keysim_quantiles": list(SIM_QUANTILES),
        "versions": versions(),
        "wall_time_s": round(time.time() - t0, 2),
    }
    stats = CalibrationStats(tensors, meta)
    if out is not None:
        stats.save(out, force=force)
    return stats
