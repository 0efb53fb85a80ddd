"""vLLM model classes for kvtool exports (``KvtoolLlamaForCausalLM`` ...).

Each is vLLM's own model of the base architecture, built so that a consumer layer (one that reads an earlier layer's
KV) projects only its queries, through a ``ColumnParallelLinear`` sharded over tensor-parallel ranks as the base's
q rows are, and attends through an ``Attention`` declared with ``kv_sharing_target_layer_name`` = its root owner.
vLLM then gives that layer no KV blocks and points it at the owner's. Owners are built and run exactly as in the base
model. While the base's ``__init__`` runs, the names ``Attention`` and ``QKVParallelLinear`` in its modules are
swapped for factories that build these pieces for consumer layers; afterwards every layer is checked to have been
built as planned, so a vLLM release that builds attention differently fails at start-up instead of serving wrong
numbers. Checkpoint tensors are checked against the map while they load (``export_map.TensorCheck``)."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear
from vllm.model_executor.models.utils import PPMissingLayer

from kvtool_vllm.export_map import BASES, KvtoolVllmError, SharingMap, TensorCheck, arch_name, read_merge

logger = init_logger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# attributes of a base attention module that change its forward in ways the consumer forward does not reproduce
_UNSUPPORTED = ("do_llama_4_scaling", "dual_chunk_attention_config")


def _layer_of(prefix: str) -> int | None:
    m = _LAYER.search(prefix)
    return int(m.group(1)) if m else None


def _retarget(prefix: str, root: int) -> str:
    """``model.layers.J.self_attn.attn`` -> ``model.layers.ROOT.self_attn.attn``."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(root)), prefix, count=1)


class QueryOnlyLinear(ColumnParallelLinear):
    """A consumer's query projection: the q rows of the base's qkv_proj, split over tensor-parallel ranks as they
    are there (so rank r computes the same query heads). Loads a checkpoint's ``q_proj`` (or a fused ``qkv_proj``
    that holds only q rows) and refuses K/V."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
        for name, w in weights:
            shard = getattr(w, "shard_id", None)
            if shard not in (None, "q"):
                raise KvtoolVllmError(f"{self.prefix} projects only queries, but the checkpoint gives it "
                                      f"{shard!r} weights")
            param = getattr(self, name)
            param.weight_loader(param, w)
            yield name


_QKV_SIG = inspect.signature(QKVParallelLinear.__init__)


@contextmanager
def _consumer_factories(smap: SharingMap, modules: list[Any]):
    """While the base model is built: ``Attention`` and ``QKVParallelLinear`` in ``modules`` build, for a consumer
    layer, a sharing attention and a query-only projection. Yields ``{layer: (attention, projection)}`` as built."""
    built: dict[int, dict[str, nn.Module]] = {}

    def attention(*args, **kwargs):
        j = _layer_of(kwargs.get("prefix", ""))
        if j is not None and j < len(smap.roots) and smap.roots[j] != j:
            kwargs["kv_sharing_target_layer_name"] = _retarget(kwargs["prefix"], smap.roots[j])
        layer = Attention(*args, **kwargs)
        built.setdefault(j, {})["attn"] = layer
        return layer

    def qkv(*args, **kwargs):
        bound = _QKV_SIG.bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        j = _layer_of(a["prefix"])
        if j is None or j >= len(smap.roots) or smap.roots[j] == j:
            lin = QKVParallelLinear(*args, **kwargs)
        else:
            lin = QueryOnlyLinear(a["hidden_size"], a["total_num_heads"] * a["head_size"], bias=a["bias"],
                                  params_dtype=a["params_dtype"], quant_config=a["quant_config"], prefix=a["prefix"],
                                  disable_tp=a["disable_tp"])
        built.setdefault(j, {})["qkv"] = lin
        return lin

    swapped = []
    for mod in modules:
        for name, real, fake in (("Attention", Attention, attention), ("QKVParallelLinear", QKVParallelLinear, qkv)):
            if mod.__dict__.get(name) is real:
                swapped.append((mod, name, real))
                setattr(mod, name, fake)
    try:
        yield built
    finally:
        for mod, name, real in swapped:
            setattr(mod, name, real)


def _consumer_forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The base attention's forward without K/V: queries (q-norm where the base has one, RoPE on q alone) over the
    root owner's cached keys and values, then the layer's own output projection."""
    q, _ = self.qkv_proj(hidden_states)
    q_norm = getattr(self, "q_norm", None)
    if q_norm is not None:
        q = q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
    q, _ = self.rotary_emb(positions, q, None)
    out, _ = self.o_proj(self.attn(q, None, None))
    return out


@cache
def _consumer_class(attn_cls: type) -> type:
    return type(f"Kvtool{attn_cls.__name__}Consumer", (attn_cls,), {"forward": _consumer_forward})


def _modules_of(cls: type) -> list[Any]:
    """The vLLM model modules whose code builds ``cls``'s layers (its own and its bases')."""
    names = {c.__module__ for c in cls.__mro__ if c.__module__.startswith("vllm.model_executor.models.")}
    return [sys.modules[n] for n in sorted(names)]


def _finish(model: nn.Module, smap: SharingMap, built: dict[int, dict[str, nn.Module]]) -> None:
    """Check that every layer of this rank was built as the map says, then turn consumers into query-only
    attention (no k_norm, the consumer forward)."""
    inner = model.model
    start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(inner.layers))
    if len(inner.layers) != len(smap.roots):
        raise KvtoolVllmError(f"vLLM built {len(inner.layers)} layers, the map has {len(smap.roots)}")
    for j in range(start, end):
        layer = inner.layers[j]
        if isinstance(layer, PPMissingLayer):
            continue
        attn = layer.self_attn
        parts = built.get(j, {})
        root = smap.roots[j]
        if root < start:
            raise KvtoolVllmError(f"pipeline parallelism puts layer {j} and its KV source, layer {root}, on "
                                  "different stages; use fewer pipeline stages or tensor parallelism")
        if getattr(attn, "attn", None) is not parts.get("attn") or getattr(attn, "qkv_proj", None) is not \
                parts.get("qkv"):
            raise KvtoolVllmError(f"kvtool_vllm does not recognise how this vLLM builds {type(attn).__name__} "
                                  f"(layer {j}); the plugin is tested with vLLM 0.32")
        target = attn.attn.kv_sharing_target_layer_name
        if root == j:
            if target is not None or not isinstance(attn.qkv_proj, QKVParallelLinear):
                raise KvtoolVllmError(f"layer {j} should own its KV cache, but vLLM built it otherwise")
            continue
        if target is None or not isinstance(attn.qkv_proj, QueryOnlyLinear) or _layer_of(target) != root:
            raise KvtoolVllmError(f"layer {j} should read layer {root}'s KV blocks, but vLLM built it otherwise")
        for feature in _UNSUPPORTED:
            if getattr(attn, feature, None):
                raise KvtoolVllmError(f"layer {j} uses {feature}, which a consumer layer does not support")
        if getattr(attn, "k_norm", None) is not None:
            attn.k_norm = None
        attn.__class__ = _consumer_class(type(attn))


_MERGE_SAID: set[str] = set()


def _say_merge(path: str) -> None:
    """The export's prompt-KV merging has no vLLM form: say so once per process, never drop it silently."""
    merge = read_merge(path)
    if merge and path not in _MERGE_SAID:
        _MERGE_SAID.add(path)
        logger.warning("kvtool_vllm: %s records prompt-KV merging (%s, budget %s), which vLLM does not run: it "
                       "serves the shared model without it (kvtool generate / kvtool.load apply it)", path,
                       merge.get("method", "?"), merge.get("budget", "?"))


def _make_class(base_type: str) -> type:
    _, arch, module = BASES[base_type]
    base_cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), arch)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        smap = SharingMap.from_config(vllm_config.model_config.hf_config)
        if smap.base_type != base_type:
            raise KvtoolVllmError(f"{arch_name(base_type)} cannot build a kvtool_{smap.base_type} export")
        with _consumer_factories(smap, _modules_of(base_cls)) as built:
            base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        _finish(self, smap, built)
        self._kvtool_map = smap
        _say_merge(str(vllm_config.model_config.model))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        check = TensorCheck(self._kvtool_map)

        def watched():
            for name, w in weights:
                check.see(name, w.shape)
                yield name, w

        loaded = base_cls.load_weights(self, watched())
        check.finish()
        return loaded

    name = arch_name(base_type)
    return type(name, (base_cls,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__,
                                    "__qualname__": name})


_BY_NAME = {arch_name(t): t for t in BASES}


def __getattr__(name: str) -> type:
    """``kvtool_vllm.models.KvtoolLlamaForCausalLM`` etc., built on first use (vLLM's registry imports by name)."""
    if name not in _BY_NAME:
        raise AttributeError(name)
    cls = _make_class(_BY_NAME[name])
    globals()[name] = cls
    return cls
