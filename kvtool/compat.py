"""What differs between the transformers releases kvtool supports, in one place."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows transformers' keyword shims to the real signature
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)``: ``cache`` on transformers >= 5.24, ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model or ``generate`` output carries (``.cache`` on >= 5.24, ``.past_key_values`` before)."""
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]
