"""``kvtool export``: a checkpoint without the consumers' K/V weights, a config that carries the map (model_type
``kvtool_<base>``, remote code beside it), and the ``kvtool.json`` sidecar (data only). Reading it back is
``kvtool.io.exported``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from kvtool.atomic import atomic_dir, check_writable_dir
from kvtool.crosslayer import attention
from kvtool.crosslayer.archs import arch_of, kv_param_names, layer_types
from kvtool.crosslayer.runtime import active_plan, apply_sharing, remove_sharing
from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import layer_shares
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import Recipe
from kvtool.formats.sidecar import SIDECAR_VERSION, write_sidecar
from kvtool.io.devices import parse_dtype
from kvtool.io.exported import base_classes
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import model_and_tokenizer, model_origin
from kvtool.merging.methods import method_from_dict
from kvtool.versions import versions

_MODELING = "modeling_kvtool.py"
_SHARING = "kvtool_sharing.py"

_MODELING_TEMPLATE = '''"""Remote code written by kvtool export: {base_model} with cross-layer KV sharing
({consumers} of {layers} layers read an earlier layer's KV).
Load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)."""

from transformers import {config_cls}, {model_cls}

from .kvtool_sharing import make_classes

KvtoolConfig, {arch} = make_classes({config_cls}, {model_cls}, __name__)
'''


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
    heal: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
) -> Path:
    """Write ``out`` atomically: safetensors weights (consumers' K/V dropped), config + remote code, tokenizer,
    generation config and ``kvtool.json``. ``model``: path/None (loaded here) or a loaded base model; an export or
    healed directory re-exports with its own map (``plan`` may then be None). ``heal``: the record of a heal run;
    ``recipe``: how the plan was made (by default what the plan's details record)."""
    check_writable_dir(out, force)
    if plan is not None and not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    if model is None and plan is None:
        raise KvtoolError("give --plan, or --model an exported directory")
    model, tokenizer = model_and_tokenizer(model, tokenizer, fallback=plan.model_source if plan else None,
                                           device=device, what="export")
    origin = model_origin(model)
    side = origin.sidecar  # a loaded export: keep its map, base identity, heal record and recipe
    if plan is None:
        if side is None:
            raise KvtoolError("give --plan (the model is not an export)")
        plan = active_plan(model)
    if side is not None:
        base_fingerprint = base_fingerprint or side["base_model"]["fingerprint"]
        heal = heal or side.get("heal")
        recipe = recipe or (Recipe.from_dict(side["recipe"]) if side.get("recipe") else None)
    recipe = recipe or Recipe.from_plan(plan)
    applied = active_plan(model)
    if applied is not None and (applied.k_sources, applied.v_sources) != (plan.k_sources, plan.v_sources):
        raise KvtoolError("the model already runs another sharing map than the plan")
    arch_of(model)
    if plan.merge is not None:  # today's form (a 0.x sidecar's flat settings are converted), fit for this map
        m = method_from_dict(plan.merge)
        layer_shares(m, plan.kv_source_layers, layer_types(model.config), plan.k_source_layers, plan.v_source_layers)
        plan = dataclasses.replace(plan, merge=m.to_dict())
    base_fp = base_fingerprint or model_fingerprint(model)
    check_fingerprint(plan.model_fingerprint, base_fp, "the plan", "pass the --model it was searched on")
    if dtype is not None:
        model = model.to(parse_dtype(dtype, "cpu"))
    base_type = model.config.model_type.removeprefix("kvtool_")
    ks, vs = plan.k_sources, plan.v_sources
    dropped = side["dropped_tensors"] if side else [
        n for j in plan.readers
        for n in kv_param_names(model, j, ("k" if ks[j] != j else "") + ("v" if vs[j] != j else ""))]
    if applied is not None:
        remove_sharing(model)
    apply_sharing(model, plan, drop_unused=True)
    weights_fp = model_fingerprint(model)
    cfg_cls, model_cls = base_classes(base_type)
    arch = attention.class_name(model_cls)
    sidecar = {
        "format": "kvtool-export",
        "format_version": SIDECAR_VERSION,
        "base_model": side["base_model"] if side else {
            "name": origin.name, "model_type": base_type, "architecture": model_cls.__name__,
            "fingerprint": base_fp, "source": origin.source},
        "weights_fingerprint": weights_fp,
        "dropped_tensors": dropped,
        "plan": plan.to_dict(),
        "versions": versions(),
        "metrics": metrics,
        "heal": heal,
        "recipe": None if recipe is None else recipe.to_dict(),
    }
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("kv_sharing_modes", None)
        if plan.per_tensor:
            cfg.update(k_source_layers=plan.k_source_layers, v_source_layers=plan.v_source_layers)
        cfg.update(model_type=f"kvtool_{base_type}", architectures=[arch],
                   kv_source_layers=plan.kv_source_layers,
                   auto_map={"AutoConfig": "modeling_kvtool.KvtoolConfig",
                             "AutoModelForCausalLM": f"modeling_kvtool.{arch}"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / _MODELING).write_text(_MODELING_TEMPLATE.format(
            base_model=sidecar["base_model"]["name"] or base_type, consumers=len(plan.consumers),
            layers=plan.num_layers, config_cls=cfg_cls.__name__, model_cls=model_cls.__name__, arch=arch))
        shutil.copyfile(attention.__file__, tmp / _SHARING)
        write_sidecar(tmp, sidecar)
    return Path(out)
