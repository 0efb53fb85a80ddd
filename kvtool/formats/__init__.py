"""File formats, pure data: the sharing plan, merge settings, calibration stats, the export sidecar, the recipe, and
the KV-cache size a plan implies. Nothing here knows torch modules."""
