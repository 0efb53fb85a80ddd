"""``SharingPlan``: which layer reads which layer's KV cache, where the plan came from, and its merge settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvtool.atomic import check_writable_file, write_bytes_atomic
from kvtool.errors import KvtoolError, quoted
from kvtool.formats.merge_settings import CompressionSettings

PLAN_VERSION = 1


@dataclass
class SharingPlan:
    """``kv_source_layers[i]`` is the layer whose KV layer ``i`` uses; ``== i`` means layer ``i`` owns its cache
    (the same meaning as transformers' MistralLarge4 field). Consumers always read an earlier *owner*."""

    kv_source_layers: list[int]
    method: str = "manual"
    target: float | None = None
    threshold: float | None = None
    score: float | None = None
    model_name: str | None = None
    model_fingerprint: str | None = None
    layer_types: list[str] | None = None
    merge: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, num_layers: int, **kw: Any) -> SharingPlan:
        return cls(list(range(num_layers)), method=kw.pop("method", "identity"), **kw)

    @classmethod
    def from_pairs(cls, num_layers: int, pairs: dict[int, int] | list[tuple[int, int]], **kw: Any) -> SharingPlan:
        """Build from ``{consumer: source}`` pairs, resolving chains (6→3, 3→1 gives 6→1 and 3→1)."""
        src = list(range(num_layers))
        for j, i in dict(pairs).items():
            src[j] = i
        return cls(resolve_chains(src), **kw)

    @classmethod
    def nearest_owner(cls, layer_types: list[str], consumers: list[int] | tuple[int, ...], **kw: Any) -> SharingPlan:
        """Each of ``consumers`` reads the nearest earlier owner of its own attention type (a quick, valid map for
        tests and self-checks)."""
        src = list(range(len(layer_types)))
        for j in consumers:
            for i in range(j - 1, -1, -1):
                if layer_types[i] == layer_types[j] and src[i] == i:
                    src[j] = i
                    break
        return cls(src, layer_types=list(layer_types), **kw)

    # ---- views ---------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kv_source_layers)

    @property
    def consumers(self) -> list[int]:
        return [i for i, s in enumerate(self.kv_source_layers) if s != i]

    @property
    def sources(self) -> list[int]:
        return sorted({s for i, s in enumerate(self.kv_source_layers) if s != i})

    @property
    def kv_fraction(self) -> float:
        """Fraction of layers that still hold a KV cache: (L - consumers) / L."""
        return (self.num_layers - len(self.consumers)) / self.num_layers

    def describe(self) -> str:
        pairs = ", ".join(f"{j}←{self.kv_source_layers[j]}" for j in self.consumers) or "none"
        return f"{len(self.consumers)}/{self.num_layers} layers share KV ({pairs})"

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None, layer_types: list[str] | None = None) -> SharingPlan:
        """Raise ``KvtoolError`` naming the first fault; return self when the plan is valid."""
        src = self.kv_source_layers
        if self.version != PLAN_VERSION:
            raise _version_error(self.version)
        if not isinstance(src, list) or not src or not all(isinstance(s, int) and not isinstance(s, bool) for s in src):
            raise KvtoolError("plan: kv_source_layers must be a non-empty list of integers")
        if num_layers is not None and len(src) != num_layers:
            raise KvtoolError(f"plan has {len(src)} layers but the model has {num_layers}")
        if src[0] != 0:
            raise KvtoolError("plan: layer 0 cannot be a consumer (it has no earlier layer to read from)")
        for j, i in enumerate(src):
            if i == j:
                continue
            if not 0 <= i < j:
                raise KvtoolError(f"plan: layer {j} reads layer {i}, which is not an earlier layer")
            if src[i] != i:
                raise KvtoolError(f"plan: layer {j} reads layer {i}, which is itself a consumer (of layer {src[i]}); "
                                  "a source must own its cache")
        types = layer_types or self.layer_types
        if types is not None:
            if len(types) != len(src):
                raise KvtoolError(f"plan: {len(types)} layer types for {len(src)} layers")
            for j, i in enumerate(src):
                if types[i] != types[j]:
                    raise KvtoolError(f"plan: layer {j} ({types[j]}) reads layer {i} ({types[i]}); "
                                      "a consumer must read a layer of the same attention type")
        if self.merge is not None:
            if not isinstance(self.merge, dict):
                raise KvtoolError("plan: merge must be an object or null")
            CompressionSettings.from_dict(self.merge)
        return self

    # ---- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"version": d.pop("version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> SharingPlan:
        if not isinstance(d, dict):
            raise KvtoolError("plan: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KvtoolError(f"plan: unknown key(s) {quoted(unknown)}")
        if "kv_source_layers" not in d:
            raise KvtoolError("plan: missing kv_source_layers")
        if "version" in d and d["version"] != PLAN_VERSION:
            raise _version_error(d["version"])
        plan = cls(**d)
        if plan.details is None:
            plan.details = {}
        return plan.validate()

    def save(self, path: str | Path, force: bool = False) -> Path:
        path = check_writable_file(path, force)
        self.validate()
        write_bytes_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SharingPlan:
        path = Path(path)
        if not path.is_file():
            raise KvtoolError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KvtoolError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _version_error(version: object) -> KvtoolError:
    return KvtoolError(f"plan version {version} is not supported (this kvtool reads version {PLAN_VERSION})")


def resolve_chains(src: list[int]) -> list[int]:
    """Point every consumer at the root owner of its chain."""
    out = list(src)
    for j in range(len(out)):
        seen = {j}
        i = out[j]
        while out[i] != i:
            if i in seen:
                raise KvtoolError(f"plan: cycle through layer {i}")
            seen.add(i)
            i = out[i]
        out[j] = i
    return out
