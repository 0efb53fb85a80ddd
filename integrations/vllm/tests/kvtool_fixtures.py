"""Test inputs for the plugin, made by kvtool in kvtool's own environment: ``python kvtool_fixtures.py OUT``.

For every architecture kvtool exports, a tiny random base model (head size 32, which vLLM's CPU attention
supports), its shared and identity exports, a per-tensor export, exports whose weights disagree with their map, and
``kvtool.load``'s greedy tokens and per-token log-probabilities on fixed inputs. Writes ``OUT/manifest.json``.
``python kvtool_fixtures.py --smollm2 OUT`` exports the embedded SmolLM2 with a fixed 9-of-30 map instead."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import kvtool
from kvtool.crosslayer.archs import layer_types
from kvtool.formats.plan import SharingPlan
from kvtool.heal import HealSettings, heal
from kvtool.io.export import export
from kvtool.io.tiny import TINY_ARCHS, save_tiny

SHAPE = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
PROMPTS = [[5, 9, 33, 17, 40], [60, 61, 3, 99, 12, 7, 7, 81], [100, 4], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
NEW_TOKENS = 16
HEALED = ("llama", "phi3")  # a LoRA-healed export (merged adapters; phi3: on its fused qkv_proj) of these
LOGPROB_IDS = [[(13 * i + 7) % 125 + 3 for i in range(96)], [(29 * i + 1) % 125 + 3 for i in range(64)]]


def _greedy(model) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(g[0, len(p):].tolist())
    return out


def _logprobs(model) -> list[list[float]]:
    out = []
    for ids in LOGPROB_IDS:
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits.float(), -1)[0, :-1]
        out.append(lp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def _remote_code_greedy(path: Path) -> list[list[int]]:
    """The same greedy tokens through plain transformers with the export's remote code."""
    from transformers import AutoModelForCausalLM

    return _greedy(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32))


def _shared_plan(types: list[str]) -> SharingPlan:
    """Half the layers (the later ones of each attention type) read the nearest earlier owner of their type."""
    consumers = [j for j in range(len(types)) if j % 2 == 1 and types[j] in types[:j]]
    return SharingPlan.nearest_owner(types, consumers)


def _rewrite_weights(src: Path, dst: Path, edit) -> None:
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    save_file(edit(w), str(dst / "model.safetensors"), metadata={"format": "pt"})


def make(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "logprob_ids": LOGPROB_IDS, "archs": {}}
    for arch in TINY_ARCHS:
        d = out / arch
        if d.exists():
            shutil.rmtree(d)
        base = save_tiny(d / "base", arch, **SHAPE)
        model, tok = kvtool.load(base)
        types = list(layer_types(model.config))
        plan = _shared_plan(types)
        export(plan, model=model, tokenizer=tok, out=d / "shared")
        export(SharingPlan(list(range(len(types)))), model=kvtool.load(base)[0], tokenizer=tok, out=d / "identity")
        k_src = list(plan.kv_source_layers)
        v_src = list(range(len(types)))
        export(SharingPlan.from_tensors(k_src, v_src, layer_types=types), model=kvtool.load(base)[0], tokenizer=tok,
               out=d / "per_tensor")
        shared, _ = kvtool.load(d / "shared")
        entry = {"layers": len(types), "owners": len(types) - len(plan.consumers),
                 "kv_source_layers": plan.kv_source_layers, "layer_types": types, "greedy": _greedy(shared),
                 "logprobs": _logprobs(shared), "base_greedy": _greedy(kvtool.load(base)[0])}
        if arch in HEALED:
            heal(plan, out=d / "healed", model=kvtool.load(base)[0], tokenizer=tok, settings=HealSettings(
                tokens=3000, text="calibration", train="lora", lora_rank=4, seq_len=32, val_rows=4, top_k=16,
                eval_every=1000, lr=1e-2))
            healed, _ = kvtool.load(d / "healed")
            entry["healed"] = {"greedy": _greedy(healed), "logprobs": _logprobs(healed),
                               "remote_code_greedy": _remote_code_greedy(d / "healed")}
        c = plan.consumers[0]
        owner = plan.kv_source_layers[c]
        # a consumer whose checkpoint still holds its own K/V: the base's full weights under the shared config
        base_weights = load_file(str(base / "model.safetensors"))
        _rewrite_weights(d / "shared", d / "consumer_holds_kv", lambda w, full=base_weights: full)
        # an owner whose checkpoint lacks its keys (or, fused, whose qkv_proj holds only query rows)

        def drop_owner_keys(w, j=owner):
            fused = f"model.layers.{j}.self_attn.qkv_proj.weight"
            if fused in w:
                w[fused] = w[fused][: SHAPE["num_attention_heads"] * SHAPE["head_dim"]].clone()
            else:
                del w[f"model.layers.{j}.self_attn.k_proj.weight"]
            return w

        _rewrite_weights(d / "shared", d / "owner_lacks_kv", drop_owner_keys)
        entry["broken"] = {"consumer_holds_kv": f"layer {c} ", "owner_lacks_kv": f"layer {owner} "}
        wrong = [(j, i) for j in plan.consumers for i in range(j) if types[i] != types[j] and i in plan.sources]
        if wrong:  # mixed attention types: point a consumer at an owner of the other type
            shutil.copytree(d / "shared", d / "wrong_type")
            cfg = json.loads((d / "wrong_type" / "config.json").read_text())
            cfg["kv_source_layers"][wrong[0][0]] = wrong[0][1]
            (d / "wrong_type" / "config.json").write_text(json.dumps(cfg, indent=2))
            entry["broken"]["wrong_type"] = "only read a cache of its own attention type"
        manifest["archs"][arch] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def make_smollm2(out: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct with 9 of its 30 layers reading their nearest earlier owner (a fixed map:
    the serving tests need a real tokenizer and chat template, not a searched plan)."""
    model, tok = kvtool.load()
    types = list(layer_types(model.config))
    export(SharingPlan.nearest_owner(types, list(range(3, 30, 3))), model=model, tokenizer=tok, out=out, force=True)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--smollm2":
        make_smollm2(Path(sys.argv[2]))
    else:
        make(Path(sys.argv[1]))
