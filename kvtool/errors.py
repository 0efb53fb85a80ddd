"""The one exception type users see: a clear, one-line message, exit code 2 from the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class KvtoolError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class CheckFailed(KvtoolError):
    """A figure in a finished report disagrees with what the plan implies: the report (written first, so nothing is
    lost) is refused, and ``report`` holds it for printing."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line reports."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def quoted(names) -> str:
    """Names as they would be typed in JSON, comma-separated and sorted (safe for one-line messages)."""
    return ", ".join(json.dumps(str(n)) for n in sorted(names, key=str))


MAX_JSON_BYTES = 64 * 2**20  # kvtool's own JSON files are kilobytes; a larger one is not one of them


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, or one ``KvtoolError`` line naming it: unreadable (a directory, a permission),
    larger than ``max_bytes``, not UTF-8, not JSON, a number too long to convert, or nested too deeply to parse."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise KvtoolError(f"{p} is too large to be a kvtool JSON file (over {max_bytes / 2**20:g} MiB)")
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise KvtoolError(f"{p} not found") from None
    except OSError as e:
        raise KvtoolError(f"cannot read {p}: {e.strerror or first_line(e)}") from None
    except UnicodeDecodeError:
        raise KvtoolError(f"{p} is damaged: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KvtoolError(f"{p} is damaged: not valid JSON ({e})") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise KvtoolError(f"{p} is damaged: {first_line(e, 120)}") from None
    except RecursionError:
        raise KvtoolError(f"{p} is damaged: nested too deeply to read") from None
