"""Model fingerprints: a short hash that tells whether a plan, calibration or export belongs to a model."""

from __future__ import annotations

import hashlib
import json

import torch

from kvtool.errors import KvtoolError


def model_fingerprint(model: torch.nn.Module, skip: set[str] | None = None) -> str:
    """A short hash of the architecture and a strided sample of every weight (in bfloat16, so a float32 and a
    bfloat16 copy of the same model agree). ``skip``: parameter names to leave out (dropped in an export)."""
    cfg = model.config.to_dict()
    cfg["model_type"] = str(cfg.get("model_type", "")).removeprefix("kvtool_")
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size")
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True).encode())
    skip = skip or set()
    for pname, p in sorted(model.state_dict().items()):
        if pname in skip:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        sample = flat[::step][:2048].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(pname.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_fingerprint(expected: str | None, actual: str, what: str, fix: str) -> None:
    """Refuse (one line) when ``what`` (a plan, a calibration, an export) was made for another model than the one at
    hand; ``expected`` None means ``what`` records no fingerprint."""
    if expected and expected != actual:
        raise KvtoolError(f"{what} was made for another model (fingerprint {expected}, this model {actual}); {fix}")
