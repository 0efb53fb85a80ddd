"""The one exception type users see: a clear, one-line message, exit code 2 from the CLI."""

from __future__ import annotations


class KvtoolError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
