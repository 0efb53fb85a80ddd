"""Reading an export without remote code: kvtool's own classes for the base architecture with the map installed,
strict weight loading, and the fingerprint check. Anything inconsistent is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoTokenizer

from kvtool.crosslayer.archs import arch_of, layer_types
from kvtool.crosslayer.attention import make_classes
from kvtool.crosslayer.runtime import sharing_state
from kvtool.errors import KvtoolError, first_line, read_json
from kvtool.formats.plan import SharingPlan
from kvtool.formats.sidecar import read_sidecar, sidecar_plan
from kvtool.io.fingerprint import model_fingerprint


def base_classes(base_type: str) -> tuple[type, type]:
    """The transformers config and *ForCausalLM classes of an architecture."""
    cfg_cls = CONFIG_MAPPING[base_type]
    return cfg_cls, MODEL_FOR_CAUSAL_LM_MAPPING[cfg_cls]


def load_exported(path: Path, *, dtype: torch.dtype, device: str, attn_implementation: str | None = None):
    """``(model, tokenizer, sidecar)`` of an export, loaded with sharing on."""
    side = read_sidecar(path)
    base_type = side["base_model"]["model_type"]
    arch_of(type("C", (), {"model_type": base_type}))
    if not (path / "config.json").is_file():
        raise KvtoolError(f"{path}/config.json is missing")
    cfg_json = read_json(path / "config.json")
    if not isinstance(cfg_json, dict):
        raise KvtoolError(f"{path}/config.json is not a JSON object")
    if cfg_json.get("model_type") != f"kvtool_{base_type}":
        raise KvtoolError(f"{path}: config model_type {cfg_json.get('model_type')!r} does not match the sidecar")
    plan = sidecar_plan(side)
    for key in ("kv_source_layers", "k_source_layers", "v_source_layers"):
        if cfg_json.get(key) != getattr(plan, key):
            raise KvtoolError(f"{path}: config.json and kvtool.json disagree on {key}")
    cfg_cls, model_cls = make_classes(*base_classes(base_type))
    config = cfg_cls.from_pretrained(path)
    SharingPlan(list(config.kv_source_layers), getattr(config, "k_source_layers", None),
                getattr(config, "v_source_layers", None)).validate(config.num_hidden_layers, layer_types(config))
    kwargs: dict[str, Any] = {"dtype": dtype, "config": config}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = model_cls.from_pretrained(path, **kwargs)  # refuses missing or unexpected tensors
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load the weights in {path}: {first_line(e)}") from e
    if model_fingerprint(model) != side["weights_fingerprint"]:
        raise KvtoolError(f"{path}: the weights' fingerprint does not match kvtool.json (modified or mixed files)")
    if device not in ("cpu", "auto"):
        model = model.to(device)
    sharing_state(model).plan = plan
    try:
        tok = AutoTokenizer.from_pretrained(path, config=config)  # our config object: no remote code is consulted
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load the tokenizer in {path}: {first_line(e)}") from e
    return model, tok, side
