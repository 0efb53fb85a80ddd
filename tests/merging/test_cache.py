"""Prompt-KV merging in the cache, for every method in the registry, alone and with layer sharing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.kv_check import kv_bytes, prefill_kv_bytes
from kvtool.crosslayer.runtime import sharing
from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import layer_counts
from kvtool.io.tiny import TINY_ARCHS, tiny_model
from kvtool.merging.compressed_cache import CompressedLayer
from kvtool.merging.hook import active_merge, merge
from kvtool.merging.methods import METHODS, KVMerger, make_method, method_from_dict
from tests.helpers import ALL_LAYERS, left_padded, plan_for
from tests.helpers import ids as _ids


@torch.no_grad()
def test_budget_one_is_bit_identical():
    m = tiny_model("llama")
    ids = _ids(t=40)
    c0 = DynamicCache(config=m.config)
    base = m(ids, **cache_kwargs(m, c0)).logits
    g0 = m.generate(ids, max_new_tokens=6, do_sample=False)
    for method in METHODS:
        with merge(m, method=method, budget=1.0, **ALL_LAYERS):
            c1 = DynamicCache(config=m.config)
            assert torch.equal(m(ids, **cache_kwargs(m, c1)).logits, base)
            assert kv_bytes(c1) == kv_bytes(c0)
            assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False), g0)
    assert not hasattr(m, "_kvtool_state")  # the context removed what it added


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_budget_is_met_exactly_per_layer_and_head(method):
    m = tiny_model("llama")
    T = 40
    with merge(m, method=method, budget=0.5, **ALL_LAYERS):
        c = DynamicCache(config=m.config)
        m(_ids(t=T), **cache_kwargs(m, c))
        for layer in c.layers:
            assert isinstance(layer, CompressedLayer) and layer.keys.shape[-2] == T // 2
        full = 2 * 6 * 2 * T * 16 * 2 * 4  # batch, layers, kv heads, tokens, head dim, K and V, fp32
        assert kv_bytes(c) == full // 2
        m(_ids(t=1), **cache_kwargs(m, c))  # decoding appends one entry per layer
        assert all(layer.keys.shape[-2] == T // 2 + 1 for layer in c.layers) and c.get_seq_length() == T + 1


def test_protected_layers_stay_whole_and_the_total_is_the_budget_exactly():
    st = KVMerger(budget=0.5)
    for T in (40, 41, 2047):
        n = layer_counts(st, list(range(30)), None, T)
        assert n[0] is None and n[1] is None and n[29] is None
        assert 2 * sum(k for k in n if k) + 2 * 3 * T == round(0.5 * 2 * 30 * T)  # K and V of 30 layers
        assert max(n[2:29]) - min(n[2:29]) <= 1  # an even split, rounded once for the whole model
    src = list(range(30))
    for j in (3, 5, 7, 9, 11, 13, 15, 17, 19):
        src[j] = j - 1
    n = layer_counts(st, src, None, 100)
    assert all(n[j] is None for j in (3, 5, 7))  # consumers store nothing
    assert 2 * sum(k for k in n if k) + 2 * 3 * 100 == round(0.5 * 2 * 21 * 100)
    with pytest.raises(KvtoolError, match="cannot be met"):
        layer_counts(KVMerger(budget=0.5), list(range(6)), None, 100)


def test_layer_budgets_split_the_same_total_unevenly():
    even = KVMerger(budget=0.5, protected_layers=[])
    lb = [0.2, 0.8, 0.5, 0.5]
    uneven = KVMerger(budget=0.5, protected_layers=[], layer_budgets=lb)
    a, b = layer_counts(even, list(range(4)), None, 100), layer_counts(uneven, list(range(4)), None, 100)
    assert a == [50, 50, 50, 50] and b == [20, 80, 50, 50] and sum(a) == sum(b)
    with pytest.raises(KvtoolError, match="another map"):  # budgets calibrated for another map are refused
        layer_counts(uneven, [0, 0, 2, 3], None, 100)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_generate_with_sharing_and_merging(arch, method):
    m = tiny_model(arch)
    plan = plan_for(m)
    ids, mask = left_padded(30, 6)
    with sharing(m, plan), merge(m, method=method, budget=0.5, **ALL_LAYERS):
        for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 5}, {"num_beams": 2, "do_sample": False}):
            out = m.generate(ids, attention_mask=mask, max_new_tokens=5, **kw)
            assert out.shape == (2, 35)
        c = DynamicCache(config=m.config)
        m(ids, attention_mask=mask, **cache_kwargs(m, c))
        owners = [i for i, s in enumerate(plan.kv_source_layers) if s == i]
        assert all(c.layers[j].keys is None or c.layers[j].keys.numel() == 0
                   for j in plan.consumers)
        stored = {i: c.layers[i].keys.shape[-2] for i in owners}
        types = layer_types(m.config)
        for i, n in stored.items():
            if types[i] == "sliding_attention":
                continue  # sliding-window layers are left alone (their cache is bounded already)
            assert n == math.floor(0.5 * 30)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_padding_content_never_leaks_into_the_real_row(method):
    m = tiny_model("llama")
    ids, mask = left_padded(30, 8)
    other = ids.clone()
    other[0, :8] = torch.arange(100, 108)
    outs = []
    with merge(m, method=method, budget=0.4, **ALL_LAYERS):
        for x in (ids, other):
            c = DynamicCache(config=m.config)
            m(x, attention_mask=mask, **cache_kwargs(m, c))
            step = torch.tensor([[5], [6]])
            am = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            outs.append(m(step, attention_mask=am, **cache_kwargs(m, c)).logits)
            # merging keeps the padding as one masked entry; eviction drops it while real tokens fill the budget
            assert c.layers[2].pad_entries.tolist() == ([1, 0] if method == "kvmerger" else [0, 0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_continuation_in_one_chunk_equals_token_by_token(method):
    """After merging, later tokens see every merged entry and each other causally, in either call path."""
    m = tiny_model("llama")
    ids = _ids(t=40)
    cont = _ids(t=6, seed=3)
    with merge(m, method=method, budget=0.5, **ALL_LAYERS):
        c1 = DynamicCache(config=m.config)
        m(ids, **cache_kwargs(m, c1))
        chunk = m(cont, **cache_kwargs(m, c1)).logits
        c2 = DynamicCache(config=m.config)
        m(ids, **cache_kwargs(m, c2))
        steps = torch.cat([m(cont[:, t : t + 1], **cache_kwargs(m, c2)).logits for t in range(cont.shape[1])], 1)
    torch.testing.assert_close(chunk, steps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_settings_round_trip_and_errors(method):
    s = make_method(method, budget=0.35, **ALL_LAYERS)
    assert method_from_dict(s.to_dict()) == s and s.to_dict()["method"] == method
    with pytest.raises(KvtoolError, match="unknown merge method"):
        make_method("zip")
    with pytest.raises(KvtoolError, match="has no setting"):
        method_from_dict({"method": method, "budget": 0.5, "bogus": 1})
    with pytest.raises(KvtoolError, match="budget"):
        make_method(method, budget=1.5)
    with pytest.raises(KvtoolError, match="layer_budgets"):
        make_method(method, budget=0.5, layer_budgets=[0.5, "x"])
    m = tiny_model("llama", attn_implementation="eager")
    with merge(m, s):  # eager works too
        m.generate(_ids(t=20), max_new_tokens=2, do_sample=False)


def test_old_flat_settings_load_as_their_method_or_are_refused_in_one_line():
    old = {"method": "h2o", "budget": 0.5, "eps": 0.75, "sigma": 5.0, "sinks": 4, "recent": 32, "heavy": 0.25,
           "size_bias": False, "protected_layers": None, "thresholds": None, "window": 64, "pool": 5,
           "min_similarity": 0.9, "merge_keys": False, "recent_share": 0.0, "mix": 0.0}
    assert method_from_dict(old) == make_method("h2o", budget=0.5)  # what 0.x's H2O read: its budget alone
    search_plan = {"method": "kvmerger", "budget": 0.5, "layer_budget": 0.4, "sigma": 5.0,
                   "protected_layers": [0, 1, 5], "thresholds": [None, None, [0.1], [0.2], [0.3], None]}
    assert method_from_dict(search_plan) == KVMerger(budget=0.5, protected_layers=[0, 1, 5])
    with pytest.raises(KvtoolError, match="re-export"):
        method_from_dict({**search_plan, "budget": None})


@torch.no_grad()
def test_export_carries_merge_settings_and_load_turns_them_on(tmp_path):
    import kvtool
    from kvtool.formats.sidecar import read_sidecar
    from kvtool.io.export import export
    from kvtool.io.tiny import save_tiny

    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    plan.merge = make_method(budget=0.5, protected_layers=[]).to_dict()
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    assert read_sidecar(tmp_path / "exp")["plan"]["merge"]["budget"] == 0.5
    m2, _ = kvtool.load(tmp_path / "exp")
    assert active_merge(m2).budget == 0.5
    c = DynamicCache(config=m2.config)
    m2(_ids(t=30), **cache_kwargs(m2, c))
    with sharing(m, plan):
        uncompressed = prefill_kv_bytes(m, _ids(t=30))
    assert c.layers[0].keys.shape[-2] == 15 and kv_bytes(c) < uncompressed
    m3, _ = kvtool.load(tmp_path / "exp", merge=False)
    assert active_merge(m3) is None
    # a plan JSON with bad merge settings is refused when used
    bad = plan.to_json().replace('"method": "kvmerger"', '"method": "zip"')
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(KvtoolError, match="unknown merge method"):
        kvtool.load(d, plan=tmp_path / "bad.json")


@torch.no_grad()
def test_without_a_budget_kvmerger_merges_by_its_threshold_and_stays_dense():
    m = tiny_model("llama")
    T = 40
    kept = []
    for eps in (0.0, 0.9):
        with merge(m, method="kvmerger", budget=None, eps=eps, recent=4, heavy=0.0, **ALL_LAYERS):
            c = DynamicCache(config=m.config)
            m(_ids(t=T), **cache_kwargs(m, c))
            kept.append([layer.keys.shape[-2] for layer in c.layers])
    assert all(a < b <= T for a, b in zip(kept[0], kept[1], strict=True))  # a lower threshold merges more


def test_size_bias_makes_a_merged_run_of_equal_tokens_exact():
    """m identical tokens merged into one entry with + log m on its logits attend exactly as the m tokens did."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    k[:, :, 2:5], v[:, :, 2:5] = k[:, :, 2:3], v[:, :, 2:3]  # tokens 2, 3, 4 are one run
    q = torch.randn(1, 2, 1, 8)  # two query heads share the KV head
    full = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 6, 8), v.expand(1, 2, 6, 8))
    layer = CompressedLayer()
    layer.update(k, v)
    keep = [0, 1, 2, 5]
    layer.compress(k[:, :, keep], v[:, :, keep], torch.tensor([0]), torch.tensor([[[1, 1, 3, 1]]]))
    mask = layer.kvtool_attention_mask(None, 4, q_heads=2, q_len=1, dtype=torch.float32)
    merged = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, keep].expand(1, 2, 4, 8),
                                                              v[:, :, keep].expand(1, 2, 4, 8), attn_mask=mask)
    torch.testing.assert_close(merged, full)
    layer.log_sizes = None  # without the bias the run is under-weighted
    plain = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, keep].expand(1, 2, 4, 8),
                                                             v[:, :, keep].expand(1, 2, 4, 8))
    assert not torch.allclose(plain, full, atol=1e-3)


@pytest.fixture(scope="module")
def llama_stats():
    from kvtool.calibration.calibrate import calibrate
    from kvtool.io.tiny import tiny_tokenizer

    m = tiny_model("llama", num_hidden_layers=8)
    return m, calibrate(m, tokenizer=tiny_tokenizer(), samples=6, seq_len=24, batch_size=4)


def test_calibrated_budgets_follow_the_key_similarity(llama_stats):
    """A layer whose consecutive keys are more alike merges more; its neighbours keep more; the total is the
    budget. Change the statistics and the allocation changes."""
    from kvtool.calibration.merge_budgets import merge_settings
    from kvtool.formats.plan import SharingPlan
    from kvtool.formats.stats import CalibrationStats

    _, st = llama_stats
    plan = SharingPlan.identity(8)
    assert merge_settings(st, 0.5, plan).get("layer_budgets") is None  # the default: an even split, nothing else
    d = merge_settings(st, 0.5, plan, allocation="calibrated")
    assert d["method"] == "kvmerger" and d["layer_budgets"][0] is None and d["layer_budgets"][7] is None
    hist = st.tensors["keysim_hist"].clone()
    bins = hist.shape[-1]
    hist[4] = 0
    hist[4, :, bins - 2] = 100  # layer 4: every consecutive pair almost identical
    hist[5] = 0
    hist[5, :, bins // 2] = 100  # layer 5: unrelated consecutive keys
    other = CalibrationStats({**st.tensors, "keysim_hist": hist}, st.meta)
    e = merge_settings(other, 0.5, plan, allocation="calibrated")
    lb = e["layer_budgets"]
    assert lb != d["layer_budgets"] and lb[4] == min(lb[2:7]) < lb[5] == max(lb[2:7])
    assert merge_settings(other, 0.5, plan, allocation="even").get("layer_budgets") is None
    for T in (64, 2048):
        even = layer_counts(make_method(budget=0.5), plan.kv_source_layers, None, T)
        cal = layer_counts(method_from_dict(e), plan.kv_source_layers, None, T)
        assert sum(c for c in cal if c) == sum(c for c in even if c)  # the same total, spent unevenly
        assert cal[4] < even[4] < cal[5]


@torch.no_grad()
def test_search_merge_budget_export_load_keeps_exactly_the_budget(llama_stats, tmp_path):
    import kvtool
    from kvtool.crosslayer.kv_check import base_units, unit_bytes
    from kvtool.io.export import export
    from kvtool.io.tiny import tiny_tokenizer
    from kvtool.search import search

    m, st = llama_stats
    res = search(st, model=m, layers=2, order="random", seed=1, merge_budget=0.5, merge_allocation="calibrated")
    assert res.plan.merge["layer_budgets"] is not None
    export(res.plan, model=m, tokenizer=tiny_tokenizer(), out=tmp_path / "exp")
    m2, _ = kvtool.load(tmp_path / "exp")
    T = 100
    c = DynamicCache(config=m2.config)
    m2(_ids(t=T, b=1), **cache_kwargs(m2, c))
    got = kv_bytes(c)
    shared_full = sum(2 * T for s, i in zip(res.plan.kv_source_layers, range(8), strict=True) if s == i)
    assert got == round(0.5 * shared_full) * unit_bytes(m2)  # exactly 0.50 of the prompt KV the map stores
    assert got < sum(base_units(m2, T)) * unit_bytes(m2)
    counts = [layer.keys.shape[-2] if layer.keys is not None and layer.keys.numel() else 0 for layer in c.layers]
    want = layer_counts(method_from_dict(res.plan.merge), res.plan.kv_source_layers, None, T)
    assert [w for w in want if w is not None] == [n for n, w in zip(counts, want, strict=True) if w is not None]


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_every_method_allocates_on_its_rows_device(method):
    """No tensor is made on the default device: with the default set to ``meta``, any allocation without
    ``device=`` lands there and mixing it with the rows fails. On CUDA (when present) the method runs there too."""
    from kvtool.merging.methods import PromptKV

    def rows(dev: str) -> PromptKV:
        g = torch.Generator().manual_seed(0)
        B, Hq, Hkv, T, D = 2, 4, 2, 24, 8
        q = torch.randn(B, Hq, T, D, generator=g).to(dev)
        k, v = torch.randn(B * Hkv, T, D, generator=g).to(dev), torch.randn(B * Hkv, T, D, generator=g).to(dev)
        pad = torch.zeros(B * Hkv, T, dtype=torch.bool, device=dev)
        pad[:Hkv, :3] = True  # the first sequence is left-padded by 3
        allowed = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None].expand(B, 1, T, T).clone()
        allowed[0, :, :, :3] = False
        return PromptKV(k, v, pad, q, allowed, D ** -0.5)

    m = make_method(method, budget=0.5)
    ref = m.reduce(rows("cpu"), 12)
    kv = rows("cpu")
    with torch.device("meta"):
        got = m.reduce(kv, 12)
    assert got.keys.device.type == "cpu" and got.keys.shape == (4, 12, 8)
    torch.testing.assert_close(got.keys, ref.keys)
    torch.testing.assert_close(got.values, ref.values)
    if torch.cuda.is_available():
        cuda = m.reduce(rows("cuda"), 12)
        assert cuda.keys.device.type == "cuda"
        assert torch.equal(cuda.positions.cpu(), ref.positions)


@torch.no_grad()
def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch, tmp_path):
    """docs/ARCHITECTURE.md's example: a dataclass with a score, registered by name, runs everywhere a name does."""
    from dataclasses import dataclass
    from typing import ClassVar

    import kvtool
    from kvtool.io.export import export
    from kvtool.io.tiny import save_tiny
    from kvtool.merging import methods
    from kvtool.merging.methods.base import PromptKV, ScoredEviction

    @dataclass
    class KNorm(ScoredEviction):
        name: ClassVar[str] = "knorm"

        def score(self, kv: PromptKV, keep: int):
            return kv.keys.float().norm(dim=-1).masked_fill(kv.pad, -float("inf"))

    monkeypatch.setitem(methods.METHODS, "knorm", KNorm)
    m, tok = kvtool.load(save_tiny(tmp_path / "base", "llama"))
    T = 40
    with merge(m, method="knorm", budget=0.5, **ALL_LAYERS):
        c = DynamicCache(config=m.config)
        m(_ids(t=T), **cache_kwargs(m, c))
        assert all(layer.keys.shape[-2] == T // 2 for layer in c.layers)
        assert prefill_kv_bytes(m, _ids(t=T)) == kv_bytes(c)  # checked per layer against layer_counts
    fresh, tok = kvtool.load(tmp_path / "base")
    plan = plan_for(fresh)
    plan.merge = {"method": "knorm", "budget": 0.5, "protected_layers": []}
    export(plan, model=fresh, tokenizer=tok, out=tmp_path / "exp")
    m2, _ = kvtool.load(tmp_path / "exp")
    assert active_merge(m2).name == "knorm"


def _merge_dicts():
    from hypothesis import strategies as st

    from tests.helpers import json_values

    keys = st.sampled_from(["method", "budget", "protected_layers", "layer_budgets", "eps", "sinks", "window",
                            "recent_share", "thresholds", "layer_budget", "size_bias", "bogus"])
    json = json_values()
    names = st.sampled_from([*METHODS, "zip"]) | json
    return st.dictionaries(keys, json, max_size=6).flatmap(
        lambda d: st.builds(lambda n: {**d, "method": n}, names)) | json


def test_any_merge_json_makes_a_method_or_fails_with_one_kvtool_error():
    from hypothesis import HealthCheck, given, settings

    @given(_merge_dicts())
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(d):
        try:
            m = method_from_dict(d)
        except KvtoolError as e:
            assert "\n" not in str(e)
        else:
            assert method_from_dict(m.to_dict()) == m

    check()
