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
    "MergeMethod": "kvtool.merging.methods",
    "METHODS": "kvtool.merging.methods",
    "make_method": "kvtool.merging.methods",
    "CalibrationStats": "kvtool.formats.stats",
    "CalibrationSettings": "kvtool.formats.recipe",
    "SearchSettings": "kvtool.formats.recipe",
    "Recipe": "kvtool.formats.recipe",
    "KvtoolError": "kvtool.errors",
    "apply_sharing": "kvtool.crosslayer.runtime",
    "remove_sharing": "kvtool.crosslayer.runtime",
    "sharing": "kvtool.crosslayer.runtime",
    "apply_merge": "kvtool.merging.hook",
    "remove_merge": "kvtool.merging.hook",
    "merge": "kvtool.merging.hook",
    "calibrate": "kvtool.calibration.calibrate",
    "compress": "kvtool.pipeline",
}
# kvtool 0.x's names for prompt-KV merging, kept for one release: (new name, its module)
_DEPRECATED = {"compression": "merge", "apply_compression": "apply_merge", "remove_compression": "remove_merge",
               "CompressionSettings": "make_method"}
__all__ = ["METHODS", "CalibrationSettings", "CalibrationStats", "KvtoolError", "MergeMethod", "Recipe",
           "SearchSettings", "SharingPlan", "__version__", "apply_merge", "apply_sharing", "calibrate", "compress",
           "load", "make_method", "merge", "remove_merge", "remove_sharing", "sharing"]

if TYPE_CHECKING:
    from kvtool.calibration.calibrate import calibrate
    from kvtool.crosslayer.runtime import apply_sharing, remove_sharing, sharing
    from kvtool.errors import KvtoolError
    from kvtool.formats.plan import SharingPlan
    from kvtool.formats.recipe import CalibrationSettings, Recipe, SearchSettings
    from kvtool.formats.stats import CalibrationStats
    from kvtool.io.loading import load
    from kvtool.merging.hook import apply_merge, merge, remove_merge
    from kvtool.merging.methods import METHODS, MergeMethod, make_method
    from kvtool.pipeline import compress


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        import warnings

        new = _DEPRECATED[name]
        warnings.warn(f"kvtool.{name} is now kvtool.{new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_API[new]), new)
    if name not in _API:
        raise AttributeError(f"module 'kvtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
