"""kvtool: calibrate, search and export cross-layer KV-cache sharing and KV merging for Hugging Face causal LMs."""

from __future__ import annotations

__version__ = "0.1.0"

from kvtool.calibrate import CalibrationStats, calibrate
from kvtool.errors import KvtoolError
from kvtool.loading import load
from kvtool.plan import SharingPlan
from kvtool.runtime import apply_sharing, remove_sharing, sharing

__all__ = ["CalibrationStats", "KvtoolError", "SharingPlan", "__version__", "apply_sharing", "calibrate", "load",
           "remove_sharing", "sharing"]
