"""``kvtool export`` and loading exports: a checkpoint without the consumers' K/V weights, a config that carries the
map (model_type ``kvtool_<base>``, remote code beside it), and the ``kvtool.json`` sidecar (data only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from kvtool.archs import arch_of, kv_param_names
from kvtool.errors import KvtoolError
from kvtool.plan import SharingPlan

SIDECAR = "kvtool.json"
SIDECAR_VERSION = 1
SIDECAR_KEYS = {"format", "format_version", "kv_source_layers", "merge", "base_model", "weights_fingerprint",
                "dropped_tensors", "plan", "versions", "metrics", "heal"}
_MODELING = "modeling_kvtool.py"
_SHARING = "kvtool_sharing.py"

_MODELING_TEMPLATE = '''"""Remote code written by kvtool export: {base_model} with cross-layer KV sharing
({consumers} of {layers} layers read an earlier layer's KV).
Load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)."""

from transformers import {config_cls}, {model_cls}

from .kvtool_sharing import make_classes

KvtoolConfig, KvtoolForCausalLM = make_classes({config_cls}, {model_cls}, __name__)
'''


def _base_classes(base_type: str) -> tuple[type, type]:
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    cfg_cls = CONFIG_MAPPING[base_type]
    return cfg_cls, MODEL_FOR_CAUSAL_LM_MAPPING[cfg_cls]


def export(
    plan: SharingPlan | str | Path | None,
    *,
    out: str | Path,
    model=None,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_size: str | int = "2GB",
    force: bool = False,
    device: str | None = None,
    metrics: dict[str, Any] | None = None,
    base_fingerprint: str | None = None,
) -> Path:
    """Write ``out`` atomically: safetensors weights (consumers' K/V dropped), config + remote code, tokenizer,
    generation config and ``kvtool.json``. ``model``: path/None (loaded here) or a loaded base model; an export or
    healed directory re-exports with its own map (``plan`` may then be None)."""
    from kvtool.atomic import atomic_dir, check_writable_dir
    from kvtool.loading import load, model_fingerprint, parse_dtype
    from kvtool.runtime import apply_sharing
    from kvtool.versions import versions

    check_writable_dir(out, force)
    if plan is not None and not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    if model is None or isinstance(model, (str, Path)):
        if model is None and plan is None:
            raise KvtoolError("give --plan, or --model an exported directory")
        model, tokenizer = load(model if model is not None else plan.details.get("model"), device=device)
    elif tokenizer is None:
        raise KvtoolError("export(model_object) needs tokenizer=")
    from kvtool.runtime import active_plan

    side = getattr(model, "kvtool_sidecar", None)  # a loaded export: keep its map, base identity and heal record
    if plan is None:
        if side is None:
            raise KvtoolError("give --plan (the model is not an export)")
        plan = model.kvtool_plan
    if side is not None:
        base_fingerprint = base_fingerprint or side["base_model"]["fingerprint"]
        model.kvtool_heal = getattr(model, "kvtool_heal", None) or side.get("heal")
    applied = active_plan(model)
    if applied is not None and applied.kv_source_layers != plan.kv_source_layers:
        raise KvtoolError("the model already runs another sharing map than the plan")
    arch_of(model)
    base_fp = base_fingerprint or model_fingerprint(model)
    if plan.model_fingerprint and plan.model_fingerprint != base_fp:
        raise KvtoolError(f"the plan was made for another model (fingerprint {plan.model_fingerprint}, "
                          f"this model {base_fp}); pass the --model it was searched on")
    if dtype is not None:
        model = model.to(parse_dtype(dtype, "cpu"))
    base_type = model.config.model_type.removeprefix("kvtool_")
    dropped = side["dropped_tensors"] if side else [n for j in plan.consumers for n in kv_param_names(model, j)]
    if applied is not None:
        from kvtool.runtime import remove_sharing

        remove_sharing(model)
    apply_sharing(model, plan, drop_unused=True)
    weights_fp = model_fingerprint(model)
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("kv_sharing_modes", None)
        cfg_cls, model_cls = _base_classes(base_type)
        cfg.update(model_type=f"kvtool_{base_type}", architectures=["KvtoolForCausalLM"],
                   kv_source_layers=plan.kv_source_layers,
                   auto_map={"AutoConfig": "modeling_kvtool.KvtoolConfig",
                             "AutoModelForCausalLM": "modeling_kvtool.KvtoolForCausalLM"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / _MODELING).write_text(_MODELING_TEMPLATE.format(
            base_model=getattr(model, "kvtool_name", base_type), consumers=len(plan.consumers),
            layers=plan.num_layers, config_cls=cfg_cls.__name__, model_cls=model_cls.__name__))
        shutil.copyfile(Path(__file__).with_name("shared_attention.py"), tmp / _SHARING)
        sidecar = {
            "format": "kvtool-export",
            "format_version": SIDECAR_VERSION,
            "kv_source_layers": plan.kv_source_layers,
            "merge": plan.merge,
            "base_model": side["base_model"] if side else {
                "name": getattr(model, "kvtool_name", None), "model_type": base_type,
                "architecture": model_cls.__name__, "fingerprint": base_fp,
                "source": getattr(model, "kvtool_source", None)},
            "weights_fingerprint": weights_fp,
            "dropped_tensors": dropped,
            "plan": plan.to_dict(),
            "versions": versions(),
            "metrics": metrics,
            "heal": getattr(model, "kvtool_heal", None),
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return Path(out)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and strictly validate ``kvtool.json`` (data only; nothing in it is executed)."""
    p = Path(path) / SIDECAR
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise KvtoolError(f"{path} has no {SIDECAR}; it is not a kvtool export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvtoolError(f"{p} is damaged: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != "kvtool-export":
        raise KvtoolError(f"{p} is not a kvtool export sidecar")
    if d.get("format_version") != SIDECAR_VERSION:
        raise KvtoolError(f"{p}: format version {d.get('format_version')} is not supported")
    unknown = set(d) - SIDECAR_KEYS
    if unknown:
        raise KvtoolError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}")
    base = d.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise KvtoolError(f"{p}: base_model.model_type missing")
    SharingPlan(d.get("kv_source_layers")).validate()
    return d


def load_exported(path: Path, *, dtype: torch.dtype, device: str, attn_implementation: str | None = None):
    """Load an export with sharing on, without remote code; refuse anything inconsistent."""
    from transformers import AutoTokenizer

    from kvtool.loading import _first_line, model_fingerprint

    side = read_sidecar(path)
    base_type = side["base_model"]["model_type"]
    arch_of(type("C", (), {"model_type": base_type}))
    try:
        cfg_json = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KvtoolError(f"{path}/config.json is missing or damaged") from e
    if cfg_json.get("model_type") != f"kvtool_{base_type}":
        raise KvtoolError(f"{path}: config model_type {cfg_json.get('model_type')!r} does not match the sidecar")
    if cfg_json.get("kv_source_layers") != side["kv_source_layers"]:
        raise KvtoolError(f"{path}: config.json and kvtool.json disagree on kv_source_layers")
    from kvtool.archs import layer_types
    from kvtool.shared_attention import make_classes

    cfg_cls, model_cls = make_classes(*_base_classes(base_type))
    config = cfg_cls.from_pretrained(path)
    SharingPlan(list(config.kv_source_layers)).validate(config.num_hidden_layers, layer_types(config))
    kwargs: dict[str, Any] = {"dtype": dtype, "config": config, "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model, info = model_cls.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load the weights in {path}: {_first_line(e)}") from e
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        desc = "; ".join(f"{k.replace('_', ' ')}: {', '.join(sorted(map(str, v))[:4])}" for k, v in problems.items())
        raise KvtoolError(f"{path}: the weights do not match the sharing map ({desc})")
    if model_fingerprint(model) != side["weights_fingerprint"]:
        raise KvtoolError(f"{path}: the weights' fingerprint does not match kvtool.json (modified or mixed files)")
    if device not in ("cpu", "auto"):
        model = model.to(device)
    plan = SharingPlan.from_dict(side["plan"]) if side.get("plan") else SharingPlan(side["kv_source_layers"])
    plan.kv_source_layers = list(side["kv_source_layers"])
    plan.merge = side.get("merge")
    model.kvtool_plan = plan
    model.kvtool_sidecar = side
    model.kvtool_name = side["base_model"].get("name") or base_type
    try:
        tok = AutoTokenizer.from_pretrained(path, config=config)  # our config object: no remote code is consulted
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load the tokenizer in {path}: {_first_line(e)}") from e
    return model, tok
