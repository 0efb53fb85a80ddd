"""Versions recorded in every output file and printed by ``kvtool doctor``."""

from __future__ import annotations

import platform
from importlib import metadata

from kvtool.version import __version__


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"kvtool": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
    for dist in ("tokenizers", "safetensors", "accelerate", "numpy", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    return out
