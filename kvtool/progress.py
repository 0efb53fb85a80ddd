"""Progress callbacks: the library reports progress through these and never prints; the CLI draws them."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]  # one human-readable line
Advance = Callable[[int], None]  # n more items done


def silent(*_args, **_kwargs) -> None:
    """The default callback: report nothing."""
