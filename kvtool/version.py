"""kvtool's version (kept apart so that ``kvtool --version`` imports nothing else)."""

__version__ = "0.1.0"
