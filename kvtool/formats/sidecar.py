"""``kvtool.json``, the sidecar of an export: the plan (the map, once, with its merge settings and details), the base
model's identity, the recipe that made it, versions and the latest eval summary. Data only: nothing in it is
executed, and it is validated strictly on read. ``config.json`` carries the copy of the map that loaders need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtool.atomic import write_json_atomic
from kvtool.errors import KvtoolError, quoted, read_json
from kvtool.formats.plan import SharingPlan

SIDECAR = "kvtool.json"
SIDECAR_VERSION = 2
SIDECAR_KEYS = {"format", "format_version", "base_model", "weights_fingerprint", "dropped_tensors", "plan",
                "versions", "metrics", "heal", "recipe"}
_V1_KEYS = {"kv_source_layers", "merge"}  # version 1 repeated the plan's map and merge settings at the top


def _from_v1(d: dict[str, Any], p: Path) -> dict[str, Any]:
    """A version-1 sidecar in today's shape (its repeated map checked against its plan, then dropped)."""
    d = dict(d)
    kv, merge = d.pop("kv_source_layers", None), d.pop("merge", None)
    plan = d.get("plan")
    if plan is None:
        d["plan"] = {"kv_source_layers": kv, "merge": merge}
    elif not isinstance(plan, dict) or plan.get("kv_source_layers") != kv or plan.get("merge") != merge:
        raise KvtoolError(f"{p}: its map and its plan disagree (a modified file); re-export it with kvtool export")
    d["format_version"] = SIDECAR_VERSION
    return d


def check_sidecar(d: Any, p: Path | str = SIDECAR) -> dict[str, Any]:
    """``d`` as a valid sidecar of today's version (a version-1 one converted), or ``KvtoolError``."""
    if not isinstance(d, dict) or d.get("format") != "kvtool-export":
        raise KvtoolError(f"{p} is not a kvtool export sidecar")
    version = d.get("format_version")
    if version == 1:
        unknown = set(d) - SIDECAR_KEYS - _V1_KEYS
        if not unknown:
            d = _from_v1(d, Path(p))
    elif version != SIDECAR_VERSION:
        raise KvtoolError(f"{p}: format version {version!r} is not supported (this kvtool reads 1 and "
                          f"{SIDECAR_VERSION}); re-export it with this kvtool")
    unknown = set(d) - SIDECAR_KEYS
    if unknown:
        raise KvtoolError(f"{p}: unknown key(s) {quoted(unknown)}")
    base = d.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str) or \
            not isinstance(base.get("fingerprint"), (str, type(None))):
        raise KvtoolError(f"{p}: base_model.model_type missing")
    if not isinstance(d.get("weights_fingerprint"), str):
        raise KvtoolError(f"{p}: weights_fingerprint missing")
    dropped = d.get("dropped_tensors")
    if not isinstance(dropped, list) or not all(isinstance(n, str) for n in dropped):
        raise KvtoolError(f"{p}: dropped_tensors must be a list of tensor names")
    for key in ("versions", "metrics", "heal", "recipe"):
        if not isinstance(d.get(key), (dict, type(None))):
            raise KvtoolError(f"{p}: {key} must be an object or null")
    try:
        SharingPlan.from_dict(d.get("plan"))
    except KvtoolError as e:
        raise KvtoolError(f"{p}: {e}") from None
    return d


def sidecar_plan(d: dict[str, Any]) -> SharingPlan:
    """The plan a (checked) sidecar holds."""
    return SharingPlan.from_dict(d["plan"])


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and strictly validate ``DIR/kvtool.json`` (a version-1 sidecar comes back in today's shape)."""
    p = Path(path) / SIDECAR
    if not p.exists():
        raise KvtoolError(f"{path} has no {SIDECAR}; it is not a kvtool export")
    return check_sidecar(read_json(p), p)


def write_sidecar(path: str | Path, sidecar: dict[str, Any]) -> None:
    """Write ``DIR/kvtool.json`` atomically (after the same validation as on read)."""
    write_json_atomic(Path(path) / SIDECAR, check_sidecar(sidecar, Path(path) / SIDECAR))


def update_sidecar(path: str | Path, **fields: Any) -> None:
    """Replace some fields of an existing export's sidecar (e.g. the latest eval ``metrics``)."""
    side = read_sidecar(path)
    side.update(fields)
    write_sidecar(path, side)
