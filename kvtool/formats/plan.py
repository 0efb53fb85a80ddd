"""``SharingPlan``: which layer reads which layer's KV cache, where the plan came from, and its merge settings.

A layer's keys and values may come from different layers (``k_source_layers`` / ``v_source_layers``); where they
agree, ``kv_source_layers`` says it alone, and a plan whose keys and values always agree (a whole-layer plan, the form
serving engines with per-layer sharing such as vLLM can use) leaves the two per-tensor lists out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvtool.atomic import check_writable_file, write_bytes_atomic
from kvtool.errors import KvtoolError, quoted, read_json
from kvtool.formats.cache_size import DEFAULT_CONTEXT, removed_share, tensor_units
from kvtool.formats.merge_settings import check_merge_dict

PLAN_VERSION = 1


@dataclass
class SharingPlan:
    """``kv_source_layers[i]`` is the layer whose KV layer ``i`` uses; ``== i`` means layer ``i`` owns its cache
    (the same meaning as transformers' MistralLarge4 field). Consumers always read an earlier *owner*.
    With per-tensor lists, ``k_source_layers[i]`` / ``v_source_layers[i]`` say where layer ``i``'s keys and values
    come from, and ``kv_source_layers[i]`` is their common source, or ``i`` where they differ."""

    kv_source_layers: list[int]
    k_source_layers: list[int] | None = None  # where keys and values come from different layers (else None)
    v_source_layers: list[int] | None = None
    method: str = "manual"
    target: float | None = None
    threshold: float | None = None
    score: float | None = None
    model_name: str | None = None
    model_fingerprint: str | None = None
    layer_types: list[str] | None = None
    merge: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # by ``kvtool search``: the recipe that ran, and what
    # it measured
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
    def from_tensors(cls, k_source_layers: list[int], v_source_layers: list[int], **kw: Any) -> SharingPlan:
        """A plan from per-tensor sources (the per-tensor lists are kept only where keys and values disagree)."""
        k, v = list(k_source_layers), list(v_source_layers)
        kv = [a if a == b else j for j, (a, b) in enumerate(zip(k, v, strict=True))]
        split = k != v
        return cls(kv, k if split else None, v if split else None, **kw)

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
    def k_sources(self) -> list[int]:
        """Where each layer's keys come from."""
        return list(self.k_source_layers if self.k_source_layers is not None else self.kv_source_layers)

    @property
    def v_sources(self) -> list[int]:
        """Where each layer's values come from."""
        return list(self.v_source_layers if self.v_source_layers is not None else self.kv_source_layers)

    @property
    def per_tensor(self) -> bool:
        """Whether some layer's keys and values come from different layers."""
        return self.k_sources != self.v_sources

    @property
    def consumers(self) -> list[int]:
        """Layers that store no KV at all (both keys and values read from elsewhere)."""
        return [i for i, s in enumerate(self.kv_source_layers) if s != i]

    @property
    def readers(self) -> list[int]:
        """Layers that read keys or values (or both) from another layer."""
        k, v = self.k_sources, self.v_sources
        return [j for j in range(self.num_layers) if k[j] != j or v[j] != j]

    @property
    def sources(self) -> list[int]:
        """Layers whose keys or values another layer reads."""
        k, v = self.k_sources, self.v_sources
        return sorted({s for j, s in enumerate(k) if s != j} | {s for j, s in enumerate(v) if s != j})

    @property
    def model_source(self) -> str | None:
        """Where the base model the plan was searched on came from (its recipe's model; None: the default)."""
        det = self.details or {}
        rec = det.get("recipe")
        return rec.get("model") if isinstance(rec, dict) else det.get("model")

    def removed_share(self, sliding_window: int | None = None, context: int = DEFAULT_CONTEXT) -> float:
        """The share of the KV-cache bytes this map removes at ``context`` tokens per sequence
        (``cache_size.removed_share``; ``sliding_window`` matters only where the plan has sliding layers)."""
        types = self.layer_types or ["full_attention"] * self.num_layers
        return removed_share(self.k_sources, self.v_sources, tensor_units(types, sliding_window, context))

    def describe(self) -> str:
        k, v = self.k_sources, self.v_sources
        moves = []
        for j in self.readers:
            if k[j] == v[j]:
                moves.append(f"{j}←{k[j]}")
            else:
                moves += [f"{j}{t}←{s}" for t, s in (("k", k[j]), ("v", v[j])) if s != j]
        if not self.per_tensor:
            return f"{len(self.consumers)}/{self.num_layers} layers share KV ({', '.join(moves) or 'none'})"
        shared = sum(a != j for j, a in enumerate(k)) + sum(b != j for j, b in enumerate(v))
        return (f"{shared}/{2 * self.num_layers} KV tensors shared over {len(self.readers)}/{self.num_layers} "
                f"layers ({', '.join(moves)})")

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None, layer_types: list[str] | None = None) -> SharingPlan:
        """Raise ``KvtoolError`` naming the first fault; return self when the plan is valid."""
        src = self.kv_source_layers
        if self.version != PLAN_VERSION:
            raise _version_error(self.version)
        lists = [("kv_source_layers", src)]
        if (self.k_source_layers is None) != (self.v_source_layers is None):
            raise KvtoolError("plan: give both k_source_layers and v_source_layers, or neither")
        if self.k_source_layers is not None:
            lists += [("k_source_layers", self.k_source_layers), ("v_source_layers", self.v_source_layers)]
        for name, lst in lists:
            if not isinstance(lst, list) or not lst or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in lst):
                raise KvtoolError(f"plan: {name} must be a non-empty list of integers")
            if len(lst) != len(src):
                raise KvtoolError(f"plan: {name} has {len(lst)} layers, kv_source_layers {len(src)}")
        if num_layers is not None and len(src) != num_layers:
            raise KvtoolError(f"plan has {len(src)} layers but the model has {num_layers}")
        k, v = self.k_sources, self.v_sources
        if [a if a == b else j for j, (a, b) in enumerate(zip(k, v, strict=True))] != src:
            raise KvtoolError("plan: kv_source_layers must be each layer's common key/value source (or the layer "
                              "itself where they differ)")
        for name in ("method", "model_name", "model_fingerprint"):
            if not isinstance(getattr(self, name), (str, type(None))) or (name == "method" and self.method is None):
                raise KvtoolError(f"plan: {name} must be a string")
        for name in ("target", "threshold", "score"):
            x = getattr(self, name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise KvtoolError(f"plan: {name} must be a number or null")
        if not isinstance(self.details, dict):
            raise KvtoolError("plan: details must be an object")
        for key in ("recipe", "measured"):
            if not isinstance(self.details.get(key), (dict, type(None))):
                raise KvtoolError(f"plan: details.{key} must be an object")
        if not isinstance(self.model_source, (str, type(None))):
            raise KvtoolError("plan: the recipe's model must be a string or null")
        if self.layer_types is not None and (not isinstance(self.layer_types, list)
                                             or not all(isinstance(t, str) for t in self.layer_types)):
            raise KvtoolError("plan: layer_types must be a list of names or null")
        types = layer_types or self.layer_types
        if types is not None and len(types) != len(src):
            raise KvtoolError(f"plan: {len(types)} layer types for {len(src)} layers")
        for what, tsrc in (("KV", src), ("keys", k), ("values", v)):
            if tsrc[0] != 0:
                raise KvtoolError(f"plan: layer 0 cannot be a consumer of {what} (it has no earlier layer to read "
                                  "from)")
            for j, i in enumerate(tsrc):
                if i == j:
                    continue
                if not 0 <= i < j:
                    raise KvtoolError(f"plan: layer {j} reads the {what} of layer {i}, which is not an earlier layer")
                if tsrc[i] != i:
                    raise KvtoolError(f"plan: layer {j} reads the {what} of layer {i}, which is itself a consumer "
                                      f"(of layer {tsrc[i]}); a source must own its cache")
                if types is not None and types[i] != types[j]:
                    raise KvtoolError(f"plan: layer {j} ({types[j]}) reads the {what} of layer {i} ({types[i]}); "
                                      "a consumer must read a layer of the same attention type")
        if self.merge is not None:
            if not isinstance(self.merge, dict):
                raise KvtoolError("plan: merge must be an object or null")
            check_merge_dict(self.merge, len(self.kv_source_layers))
        return self

    # ---- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["k_source_layers"] is None and d["v_source_layers"] is None:  # a whole-layer plan: as before
            del d["k_source_layers"], d["v_source_layers"]
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
        return cls.from_dict(read_json(path))


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
