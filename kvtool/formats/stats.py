"""``CalibrationStats``: what ``kvtool calibrate`` writes (``stats.safetensors`` + ``calibration.json``), and the
histogram arithmetic of consecutive-key similarity. Tensors and metadata only; nothing here runs a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvtool.atomic import atomic_dir
from kvtool.errors import KvtoolError, first_line, read_json

STATS_VERSION = 1
SIM_BINS = 400  # histogram of consecutive-key cosine similarity over [-1, 1]
SIM_EPS = (0.5, 0.75, 0.9)
SIM_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
DISTANCES = ("euclidean", "kvsharer", "cosine")


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

    def save(self, out: str | Path, force: bool = False, extra: dict[str, bytes] | None = None) -> Path:
        """Write the directory atomically; ``extra`` files (name -> bytes, e.g. a heatmap PNG) go in with it."""
        with atomic_dir(out, force) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "stats.safetensors"))
            (tmp / "calibration.json").write_text(json.dumps(self.meta, indent=2) + "\n")
            for name, data in (extra or {}).items():
                (tmp / name).write_bytes(data)
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        p = Path(path)
        if not (p / "calibration.json").is_file() or not (p / "stats.safetensors").is_file():
            raise KvtoolError(f"{p} is not a calibration directory (run `kvtool calibrate --out {p}` first)")
        try:
            meta = read_json(p / "calibration.json")
            tensors = load_file(str(p / "stats.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise KvtoolError(f"{p}: calibration files are damaged ({first_line(e, 200)})") from e
        if not isinstance(meta, dict) or meta.get("version") != STATS_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise KvtoolError(f"{p}: calibration format {meta.get('version')} is not supported")
        need = {"k_mean", "v_mean", "input_ids", "final_hidden", "keysim_hist"} | {f"dist_{d}" for d in DISTANCES}
        missing = need - set(tensors)
        if missing:
            raise KvtoolError(f"{p}: stats.safetensors lacks {', '.join(sorted(missing))}")
        _check_meta(p, meta, tensors)
        return cls(tensors, meta)


# calibration.json's fields that search, compare and the merge budgets read, with the JSON types they need
_META_TYPES: dict[str, tuple[type, ...]] = {"model_name": (str,), "model_fingerprint": (str,), "data": (str,),
                                            "data_hash": (str,), "samples": (int,), "seq_len": (int,),
                                            "seed": (int,), "num_layers": (int,), "layer_types": (list,)}


def _check_meta(p: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """calibration.json's fields have the types its readers use, and the tensors the shapes its layer count implies."""
    for key, types in _META_TYPES.items():
        v = meta.get(key)
        if not isinstance(v, types) or isinstance(v, bool):
            raise KvtoolError(f"{p}/calibration.json: {key} must be {' or '.join(t.__name__ for t in types)}, "
                              f"got {type(v).__name__ if key in meta else 'nothing'}")
    for key, t in (("model", str), ("dtype", str), ("sliding_window", int), ("settings", dict)):
        v = meta.get(key)
        if v is not None and (not isinstance(v, t) or isinstance(v, bool)):
            raise KvtoolError(f"{p}/calibration.json: {key} must be {'an object' if t is dict else t.__name__} "
                              "or null")
    L = meta["num_layers"]
    if L < 1 or len(meta["layer_types"]) != L or not all(isinstance(t, str) for t in meta["layer_types"]):
        raise KvtoolError(f"{p}/calibration.json: layer_types must be {L} strings, one per layer")
    shapes = {"k_mean": 4, "v_mean": 4, "keysim_hist": 3, **{f"dist_{d}": 2 for d in DISTANCES}}
    for name, dims in shapes.items():
        t = tensors[name]
        if t.dim() != dims or t.shape[0] != L or (dims == 2 and t.shape[1] != L):
            raise KvtoolError(f"{p}: stats.safetensors' {name} has shape {list(t.shape)}, not {L} layers")
    if tensors["input_ids"].dim() != 2 or tensors["final_hidden"].shape[:1] != tensors["input_ids"].shape[:1]:
        raise KvtoolError(f"{p}: stats.safetensors' input_ids and final_hidden disagree on the chunk count")
