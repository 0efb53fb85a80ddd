"""kvtool: calibrate, search and export cross-layer KV-cache sharing and KV merging for Hugging Face causal LMs.

The public API is imported lazily, so ``import kvtool`` (and ``kvtool --help``) stays fast; each name lives in the
module listed in ``_API``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvtool.version import __version__

_API = {
    "load": "kvtool.io.loading",
    "SharingPlan": "kvtool.formats.plan",
    "CompressionSettings": "kvtool.formats.merge_settings",
    "CalibrationStats": "kvtool.formats.stats",
    "CalibrationSettings": "kvtool.formats.recipe",
    "SearchSettings": "kvtool.formats.recipe",
    "Recipe": "kvtool.formats.recipe",
    "KvtoolError": "kvtool.errors",
    "apply_sharing": "kvtool.crosslayer.runtime",
    "remove_sharing": "kvtool.crosslayer.runtime",
    "sharing": "kvtool.crosslayer.runtime",
    "apply_compression": "kvtool.merging.compressor",
    "remove_compression": "kvtool.merging.compressor",
    "compression": "kvtool.merging.compressor",
    "calibrate": "kvtool.calibration.calibrate",
    "compress": "kvtool.pipeline",
}
__all__ = ["CalibrationSettings", "CalibrationStats", "CompressionSettings", "KvtoolError", "Recipe", "SearchSettings",
           "SharingPlan", "__version__", "apply_compression", "apply_sharing", "calibrate", "compress", "compression",
           "load", "remove_compression", "remove_sharing", "sharing"]

if TYPE_CHECKING:
    from kvtool.calibration.calibrate import calibrate
    from kvtool.crosslayer.runtime import apply_sharing, remove_sharing, sharing
    from kvtool.errors import KvtoolError
    from kvtool.formats.merge_settings import CompressionSettings
    from kvtool.formats.plan import SharingPlan
    from kvtool.formats.recipe import CalibrationSettings, Recipe, SearchSettings
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.loading import load
    from kvtool.merging.compressor import apply_compression, compression, remove_compression
    from kvtool.pipeline import compress


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kvtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
