"""What a kvtool export asks of vLLM, read from its files and checked before any weight is loaded.

Pure Python (no torch, no vLLM): the model classes, the engine and ``python -m kvtool_vllm check DIR`` share it.
Everything vLLM cannot run as the export means is refused with one line (``KvtoolVllmError``)."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class KvtoolVllmError(ValueError):
    """An export vLLM cannot serve as it means: one line, never a silent fallback."""


# kvtool base model_type -> (transformers config class, architecture, vLLM module under vllm.model_executor.models)
BASES: dict[str, tuple[str, str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3"),
}


def arch_name(base_type: str) -> str:
    """The architecture a kvtool export of ``base_type`` names (kvtool's ``class_name``): never the base's own."""
    return f"Kvtool{BASES[base_type][1]}"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


@dataclass(frozen=True)
class SharingMap:
    """Which layer each layer reads its KV from (``roots[j] == j``: it owns its cache), with the head shapes the
    checks need."""

    base_type: str
    roots: tuple[int, ...]
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    merge: Any = field(default=None, compare=False)

    @property
    def consumers(self) -> list[int]:
        return [j for j, s in enumerate(self.roots) if s != j]

    @property
    def owners(self) -> list[int]:
        return [j for j, s in enumerate(self.roots) if s == j]

    @classmethod
    def from_config(cls, cfg: Any) -> SharingMap:
        """Read and check the map in an export's config (a dict of config.json or a transformers config)."""
        model_type = str(_get(cfg, "model_type", ""))
        base_type = model_type.removeprefix("kvtool_")
        if not model_type.startswith("kvtool_") or base_type not in BASES:
            known = ", ".join(f"kvtool_{t}" for t in BASES)
            raise KvtoolVllmError(f"model_type {model_type!r} is not a kvtool export this plugin serves ({known})")
        layers = _get(cfg, "num_hidden_layers")
        src = _get(cfg, "kv_source_layers")
        if not isinstance(layers, int) or not isinstance(src, list) or len(src) != layers:
            raise KvtoolVllmError(f"kv_source_layers must list one source per layer ({layers} layers), got {src!r}")
        for key in ("k_source_layers", "v_source_layers"):
            per = _get(cfg, key)
            if per is not None and list(per) != list(src):
                if len(per) != len(src):
                    raise KvtoolVllmError(f"{key} lists {len(per)} layers, kv_source_layers {len(src)}")
                j = next(j for j, (a, b) in enumerate(zip(per, src, strict=True)) if a != b)
                raise KvtoolVllmError(
                    f"a per-tensor plan (layer {j} takes its {'keys' if key[0] == 'k' else 'values'} from layer "
                    f"{per[j]}, its other tensor from layer {src[j]}) has no vLLM form: vLLM keeps a layer's keys and "
                    "values in one cache; export a whole-layer plan (kvtool search --granularity layer)")
        types = _get(cfg, "layer_types") or ["full_attention"] * layers
        if len(types) != layers:
            raise KvtoolVllmError(f"layer_types lists {len(types)} layers, the model has {layers}")
        roots: list[int] = []
        for j, s in enumerate(src):
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= j:
                raise KvtoolVllmError(f"layer {j} reads KV from {s!r}: a source must be an earlier layer (or itself)")
            root = s
            while roots and root != j and roots[root] != root:  # a chain j -> s -> t reads t's blocks
                root = roots[root]
            if types[root] != types[j]:
                raise KvtoolVllmError(f"layer {j} ({types[j]}) reads layer {root} ({types[root]}): a consumer can "
                                      "only read a cache of its own attention type")
            roots.append(root)
        heads = int(_get(cfg, "num_attention_heads"))
        head_dim = _get(cfg, "head_dim") or int(_get(cfg, "hidden_size")) // heads
        return cls(base_type, tuple(roots), tuple(types), heads, int(_get(cfg, "num_key_value_heads") or heads),
                   int(head_dim))


_ATTN_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj|k_norm)\.(weight|bias)$")


class TensorCheck:
    """Checks checkpoint tensors against the map as they stream by: a consumer must hold no K/V of its own (no
    k_proj, v_proj, k_norm, or K/V rows in a fused qkv_proj), an owner must hold all of them. Without this, vLLM
    would fill the missing rows of its fused qkv_proj with uninitialised memory and raise nothing."""

    def __init__(self, smap: SharingMap) -> None:
        self.smap = smap
        self.seen: dict[int, set[str]] = {j: set() for j in range(len(smap.roots))}

    def see(self, name: str, shape: Iterable[int]) -> None:
        m = _ATTN_TENSOR.search(name)
        if m is None:
            return
        j, proj, kind = int(m.group(1)), m.group(2), m.group(3)
        if j >= len(self.smap.roots):
            raise KvtoolVllmError(f"the checkpoint holds {name}, but the model has {len(self.smap.roots)} layers")
        consumer = self.smap.roots[j] != j
        rows = list(shape)[0] if list(shape) else 0
        q_rows = self.smap.num_heads * self.smap.head_dim
        kv_rows = self.smap.num_kv_heads * self.smap.head_dim
        if consumer and proj in ("k_proj", "v_proj", "k_norm"):
            raise KvtoolVllmError(f"layer {j} reads layer {self.smap.roots[j]}'s KV, but the checkpoint still holds "
                                  f"its own {name}: the weights do not match the map in config.json")
        if proj == "qkv_proj":
            want = q_rows if consumer else q_rows + 2 * kv_rows
            if rows != want:
                what = "queries only" if consumer else "queries, keys and values"
                raise KvtoolVllmError(f"{name} has {rows} rows; layer {j} should hold its {what} ({want} rows): the "
                                      "weights do not match the map in config.json")
            self.seen[j].update({f"q_proj.{kind}", f"k_proj.{kind}", f"v_proj.{kind}"} if not consumer
                                else {f"q_proj.{kind}"})
            return
        self.seen[j].add(f"{proj}.{kind}")

    def finish(self) -> None:
        """After the last tensor: every owner that has a query projection has its keys and values too."""
        for j in self.smap.owners:
            for kind in ("weight", "bias"):
                if f"q_proj.{kind}" in self.seen[j]:
                    lacking = [p for p in ("k_proj", "v_proj") if f"{p}.{kind}" not in self.seen[j]]
                    if lacking:
                        raise KvtoolVllmError(f"layer {j} owns its KV cache, but the checkpoint has no "
                                              f"{' or '.join(lacking)} {kind} for it: the weights do not match the "
                                              "map in config.json")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_export(path: str | Path) -> SharingMap:
    """Read an export directory's config.json, sidecar and safetensors headers, and check them as the plugin will
    when vLLM loads it; return the map (one-line ``KvtoolVllmError`` otherwise)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise KvtoolVllmError(f"{path}/config.json is missing or not JSON ({type(e).__name__})") from None
    smap = SharingMap.from_config(cfg)
    archs = cfg.get("architectures") or []
    if archs != [arch_name(smap.base_type)]:
        raise KvtoolVllmError(f"{path}: architectures is {archs}, a kvtool export of {smap.base_type} names "
                              f"[{arch_name(smap.base_type)!r}]")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KvtoolVllmError(f"{path} holds no .safetensors weights")
    check = TensorCheck(smap)
    for f in files:
        try:
            shapes = _safetensors_shapes(f)
        except (OSError, ValueError, struct.error) as e:
            raise KvtoolVllmError(f"cannot read the safetensors header of {f.name} ({type(e).__name__})") from None
        for name, shape in shapes.items():
            check.see(name, shape)
    check.finish()
    return SharingMap(**{**smap.__dict__, "merge": read_merge(path)})


def read_merge(path: str | Path) -> Any:
    """The prompt-KV merging setting an export's kvtool.json records (None when none or no sidecar): its plan's
    ``merge`` (format 2; format 1 repeated it at the top)."""
    try:
        side = json.loads((Path(path) / "kvtool.json").read_text())
        return side["plan"].get("merge") if side.get("format_version", 1) >= 2 else side.get("merge")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
