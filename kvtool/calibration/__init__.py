"""Calibration: one pass over text that collects the per-layer KV statistics the search and the merger use."""
