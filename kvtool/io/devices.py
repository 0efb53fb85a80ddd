"""Devices and dtypes as the user names them (``--device``, ``--dtype``)."""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU and bfloat16 on a GPU unless named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise KvtoolError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def parse_device(device: str | None) -> str:
    """cpu, cuda, cuda:N or auto (accelerate's placement); the default is cuda when one is visible."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise KvtoolError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if device != "cpu" and not torch.cuda.is_available():
        raise KvtoolError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's (first) parameters live: where its inputs go."""
    return next(model.parameters()).device
