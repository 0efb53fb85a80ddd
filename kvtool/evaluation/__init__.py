"""``kvtool eval``: the base and the shared model side by side, one module per task."""
