"""Reading a settings dataclass from JSON: known keys only, each of its field's scalar type."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from kvtool.errors import KvtoolError, quoted

_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "None": (type(None),)}


def settings_from_dict(cls, d: Any, what: str):
    """``cls`` from a JSON object whose keys are its fields and whose values have the fields' scalar types."""
    if not isinstance(d, dict):
        raise KvtoolError(f"{what} must be a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise KvtoolError(f"{what}: unknown key(s) {quoted(unknown)}")
    for k, v in d.items():
        allowed = [t for name in str(known[k].type).split("|") for t in _TYPES.get(name.strip(), ())]
        if allowed and (not isinstance(v, tuple(allowed)) or (isinstance(v, bool) and bool not in allowed)):
            raise KvtoolError(f"{what}: {k} must be {str(known[k].type).replace(' | None', ' or null')}, got "
                              f"{json.dumps(v)[:40]}")
    return cls(**d).validated()
