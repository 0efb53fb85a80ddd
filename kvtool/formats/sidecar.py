"""``kvtool.json``, the sidecar of an export: the map, the base model's identity, the recipe that made it, versions
and the latest eval summary. Data only: nothing in it is executed, and it is validated strictly on read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtool.atomic import write_json_atomic
from kvtool.errors import KvtoolError, quoted, read_json
from kvtool.formats.plan import SharingPlan

SIDECAR = "kvtool.json"
SIDECAR_VERSION = 1
SIDECAR_KEYS = {"format", "format_version", "kv_source_layers", "merge", "base_model", "weights_fingerprint",
                "dropped_tensors", "plan", "versions", "metrics", "heal", "recipe"}


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and strictly validate ``DIR/kvtool.json``."""
    p = Path(path) / SIDECAR
    if not p.exists():
        raise KvtoolError(f"{path} has no {SIDECAR}; it is not a kvtool export")
    d = read_json(p)
    if not isinstance(d, dict) or d.get("format") != "kvtool-export":
        raise KvtoolError(f"{p} is not a kvtool export sidecar")
    if d.get("format_version") != SIDECAR_VERSION:
        raise KvtoolError(f"{p}: format version {d.get('format_version')} is not supported")
    unknown = set(d) - SIDECAR_KEYS
    if unknown:
        raise KvtoolError(f"{p}: unknown key(s) {quoted(unknown)}")
    base = d.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise KvtoolError(f"{p}: base_model.model_type missing")
    SharingPlan(d.get("kv_source_layers")).validate()
    return d


def write_sidecar(path: str | Path, sidecar: dict[str, Any]) -> None:
    """Write ``DIR/kvtool.json`` atomically (after the same validation as on read)."""
    unknown = set(sidecar) - SIDECAR_KEYS
    if unknown:
        raise KvtoolError(f"sidecar: unknown key(s) {quoted(unknown)}")
    write_json_atomic(Path(path) / SIDECAR, sidecar)


def update_sidecar(path: str | Path, **fields: Any) -> None:
    """Replace some fields of an existing export's sidecar (e.g. the latest eval ``metrics``)."""
    side = read_sidecar(path)
    side.update(fields)
    write_sidecar(path, side)
