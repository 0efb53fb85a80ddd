"""Per-tensor sharing (a layer reads its keys, its values, or both from earlier layers) on every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache

import kvtool
from kvtool.compat import cache_kwargs, output_cache
from kvtool.crosslayer.kv_check import check_kv_in_effect, implied_bytes, layer_bytes, unit_bytes
from kvtool.crosslayer.runtime import apply_sharing, sharing
from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import kv_units
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.tiny import TINY_ARCHS, save_tiny, tiny_model
from kvtool.merging.hook import merge
from tests.helpers import ids as _ids
from tests.helpers import tensor_plan_for


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


def test_plan_format_per_tensor():
    plan = SharingPlan.from_tensors([0, 0, 2, 0], [0, 1, 0, 0])
    assert plan.per_tensor and plan.kv_source_layers == [0, 1, 2, 0]
    assert plan.readers == [1, 2, 3] and plan.consumers == [3] and plan.removed_share() == 4 / 8
    d = json.loads(plan.to_json())
    assert d["k_source_layers"] == [0, 0, 2, 0] and d["v_source_layers"] == [0, 1, 0, 0]
    assert SharingPlan.from_dict(d) == plan
    whole = SharingPlan.from_tensors([0, 0, 2], [0, 0, 2])
    assert not whole.per_tensor and "k_source_layers" not in whole.to_dict()
    assert "2k←0" in SharingPlan.from_tensors([0, 1, 0], [0, 1, 2]).describe()


@pytest.mark.parametrize("k,v,match", [
    ([0, 0, 1], [0, 1, 2], "keys of layer 1, which is itself a consumer"),  # layer 1 does not own its keys
    ([0, 1, 2], [0, 2, 2], "not an earlier layer"),
    ([1, 1], [0, 1], "layer 0 cannot"),
])
def test_plan_validation_per_tensor(k, v, match):
    with pytest.raises(KvtoolError, match=match):
        SharingPlan.from_tensors(k, v).validate()


def test_inconsistent_common_list_is_refused():
    with pytest.raises(KvtoolError, match="common key/value source"):
        SharingPlan.from_dict({"kv_source_layers": [0, 0, 2], "k_source_layers": [0, 0, 0],
                               "v_source_layers": [0, 1, 0]})


@torch.no_grad()
def test_cached_equals_uncached_and_projections_skipped(arch):
    m = tiny_model(arch)
    plan = tensor_plan_for(m)
    assert plan.per_tensor
    calls = {}
    hooks = []
    for i, layer in enumerate(m.model.layers):
        for name in ("k_proj", "v_proj"):
            mod = getattr(layer.self_attn, name, None)
            if mod is not None:
                calls[(i, name[0])] = 0
                hooks.append(mod.register_forward_hook(
                    lambda *a, key=(i, name[0]): calls.__setitem__(key, calls[key] + 1)))
    ids = _ids(t=20)
    with sharing(m, plan):
        full = m(ids, use_cache=False).logits
        cache = DynamicCache(config=m.config)
        steps = [m(ids[:, t: t + 1], **cache_kwargs(m, cache), use_cache=True).logits for t in range(ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    for h in hooks:
        h.remove()
    src = {"k": plan.k_sources, "v": plan.v_sources}
    for (i, t), n in calls.items():
        assert (n == 0) == (src[t][i] != i), (i, t, n)
    assert (full - m(ids, use_cache=False).logits).abs().max() > 1e-3


@torch.no_grad()
def test_cache_bytes_equal_the_tensor_count(arch):
    m = tiny_model(arch, max_position_embeddings=512)
    plan = tensor_plan_for(m)
    ids = _ids(t=6)
    apply_sharing(m, plan)
    out = output_cache(m.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True))
    cfg = m.config
    want = kv_units(plan.k_sources, plan.v_sources, plan.layer_types, getattr(cfg, "sliding_window", None), 6, 1)
    assert layer_bytes(out) == [w * unit_bytes(m, 2) for w in want]
    assert sum(layer_bytes(out)) == implied_bytes(m, plan, None, 2, 6, 1)
    assert 0 < check_kv_in_effect(m, 6) < 1


@torch.no_grad()
def test_generate_paths(arch):
    m = tiny_model(arch)
    apply_sharing(m, tensor_plan_for(m))
    ids = _ids(1, 6)
    greedy = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    static = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(greedy, static)
    assert m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=3).shape[1] == 10
    logits = m(greedy[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, 5:].argmax(-1), greedy[0, 6:])
    a, b = _ids(1, 10, seed=1), _ids(1, 6, seed=2)
    pad = m.config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 4), pad), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = m.generate(batch, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out[0, 10:], m.generate(a, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, 10:])
    assert torch.equal(out[1, 10:], m.generate(b, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, 6:])


@torch.no_grad()
def test_static_cache_holds_only_owned_tensors():
    m = tiny_model("llama")
    plan = tensor_plan_for(m)
    apply_sharing(m, plan)
    out = m.generate(_ids(1, 6), max_new_tokens=3, do_sample=False, cache_implementation="static",
                     return_dict_in_generate=True)
    cache = output_cache(out)
    per_layer = layer_bytes(cache)
    for j in range(m.config.num_hidden_layers):
        owned = (plan.k_sources[j] == j) + (plan.v_sources[j] == j)
        assert (per_layer[j] == 0) == (owned == 0)
        if owned:
            assert per_layer[j] == owned * per_layer[0] // 2


@torch.no_grad()
def test_merging_composes_with_tensor_plans(arch):
    m = tiny_model(arch, max_position_embeddings=512)
    plan = tensor_plan_for(m, moves=((3, "k"), (5, "k"), (5, "v")))
    apply_sharing(m, plan)
    ids = _ids(1, 40)
    unmerged = check_kv_in_effect(m, 40)
    for method in ("kvmerger", "h2o"):
        with merge(m, method=method, budget=0.7, protected_layers=[]):
            share = check_kv_in_effect(m, 40)  # every layer's bytes checked against the plan and the budget
            out = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert share < unmerged and out.shape[1] == 44


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_export_and_remote_code(arch, tmp_path):
    d = save_tiny(tmp_path / "base", arch)
    m, tok = kvtool.load(d)
    plan = tensor_plan_for(m)
    x = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sharing(m, plan):
        ref = m(x).logits
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    m2, _ = kvtool.load(tmp_path / "exp")
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True)
    for mm in (m2, m3):
        with torch.no_grad():
            torch.testing.assert_close(mm(x).logits, ref, atol=1e-5, rtol=0)
            g = mm.generate(x[:1, :6], max_new_tokens=4, do_sample=False, cache_implementation="static")
            torch.testing.assert_close(mm(g[:, :-1], use_cache=False).logits[0, 5:].argmax(-1), g[0, 6:])
    assert m3.config.k_source_layers == plan.k_sources and m3.config.v_source_layers == plan.v_sources
    base, exp = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "exp" / "model.safetensors"))
    if arch != "phi3":
        want = {f"model.layers.{j}.self_attn.{t}_proj.weight" for t, src in (("k", plan.k_sources),
                                                                             ("v", plan.v_sources))
                for j in range(len(src)) if src[j] != j}
        assert {n for n in set(base) - set(exp) if n.endswith("proj.weight")} == want
    else:  # a fused qkv_proj keeps only the rows of what the layer owns
        for j in plan.readers:
            n = f"model.layers.{j}.self_attn.qkv_proj.weight"
            assert exp[n].shape[0] < base[n].shape[0]
