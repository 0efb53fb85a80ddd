"""Versions recorded in every output file."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from kvtool import __version__

    return {"kvtool": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}
