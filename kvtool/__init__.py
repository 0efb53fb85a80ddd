"""kvtool: calibrate, search and export cross-layer KV-cache sharing and KV merging for Hugging Face causal LMs."""

from __future__ import annotations

__version__ = "0.1.0"

from kvtool.calibrate import CalibrationStats, calibrate
from kvtool.compression import CompressionSettings, apply_compression, compression, remove_compression
from kvtool.errors import KvtoolError
from kvtool.loading import load
from kvtool.plan import SharingPlan
from kvtool.runtime import apply_sharing, remove_sharing, sharing

__all__ = ["CalibrationStats", "CompressionSettings", "KvtoolError", "SharingPlan", "__version__", "apply_compression",
           "apply_sharing", "calibrate", "compression", "load", "remove_compression", "remove_sharing", "sharing"]
