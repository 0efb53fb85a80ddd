"""Prompt KV compression in the cache (KVMerger, H2O, StreamingLLM), alone and with layer sharing."""

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
from kvtool.formats.merge_settings import METHODS, CompressionSettings, layer_keep
from kvtool.io.tiny import TINY_ARCHS, tiny_model
from kvtool.merging.compressed_cache import CompressedLayer
from kvtool.merging.compressor import active_compression, compression
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
        with compression(m, method=method, budget=1.0, **ALL_LAYERS):
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
    with compression(m, method=method, budget=0.5, **ALL_LAYERS):
        c = DynamicCache(config=m.config)
        m(_ids(t=T), **cache_kwargs(m, c))
        for layer in c.layers:
            assert isinstance(layer, CompressedLayer) and layer.keys.shape[-2] == T // 2
        full = 2 * 6 * 2 * T * 16 * 2 * 4  # batch, layers, kv heads, tokens, head dim, K and V, fp32
        assert kv_bytes(c) == full // 2
        m(_ids(t=1), **cache_kwargs(m, c))  # decoding appends one entry per layer
        assert all(layer.keys.shape[-2] == T // 2 + 1 for layer in c.layers) and c.get_seq_length() == T + 1


def test_protected_layers_get_a_tighter_share_and_sharing_counts_owners():
    st = CompressionSettings(budget=0.5)
    keep = layer_keep(st, list(range(30)), None)
    assert keep[0] is None and keep[1] is None and keep[29] is None
    assert sum(k for k in keep if k) + 3 == pytest.approx(0.5 * 30)
    src = list(range(30))
    for j in (3, 5, 7, 9, 11, 13, 15, 17, 19):
        src[j] = j - 1
    keep = layer_keep(st, src, None)
    assert all(keep[j] is None for j in (3, 5, 7))  # consumers store nothing
    assert sum(k for k in keep if k) + 3 == pytest.approx(0.5 * 21)
    with pytest.raises(KvtoolError, match="cannot be met"):
        layer_keep(CompressionSettings(budget=0.5), list(range(6)), None)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_generate_with_sharing_and_compression(arch, method):
    m = tiny_model(arch)
    plan = plan_for(m)
    ids, mask = left_padded(30, 6)
    with sharing(m, plan), compression(m, method=method, budget=0.5, **ALL_LAYERS):
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
    with compression(m, method=method, budget=0.4, **ALL_LAYERS):
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
    """After compression, later tokens see every compressed entry and each other causally, in either call path."""
    m = tiny_model("llama")
    ids = _ids(t=40)
    cont = _ids(t=6, seed=3)
    with compression(m, method=method, budget=0.5, **ALL_LAYERS):
        c1 = DynamicCache(config=m.config)
        m(ids, **cache_kwargs(m, c1))
        chunk = m(cont, **cache_kwargs(m, c1)).logits
        c2 = DynamicCache(config=m.config)
        m(ids, **cache_kwargs(m, c2))
        steps = torch.cat([m(cont[:, t : t + 1], **cache_kwargs(m, c2)).logits for t in range(cont.shape[1])], 1)
    torch.testing.assert_close(chunk, steps, rtol=1e-4, atol=1e-4)


def test_settings_round_trip_and_errors():
    s = CompressionSettings(method="h2o", budget=0.35)
    assert CompressionSettings.from_dict(s.to_dict()) == s
    with pytest.raises(KvtoolError, match="unknown compression method"):
        CompressionSettings(method="zip").validate()
    with pytest.raises(KvtoolError, match="unknown key"):
        CompressionSettings.from_dict({"budget": 0.5, "bogus": 1})
    with pytest.raises(KvtoolError, match="budget"):
        CompressionSettings(budget=1.5).validate()
    m = tiny_model("llama", attn_implementation="eager")
    with compression(m, budget=0.5, **ALL_LAYERS):  # eager works too
        m.generate(_ids(t=20), max_new_tokens=2, do_sample=False)


@torch.no_grad()
def test_export_carries_merge_settings_and_load_turns_them_on(tmp_path):
    import kvtool
    from kvtool.formats.sidecar import read_sidecar
    from kvtool.io.export import export
    from kvtool.io.tiny import save_tiny

    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    plan.merge = CompressionSettings(budget=0.5, protected_layers=[]).to_dict()
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    assert read_sidecar(tmp_path / "exp")["merge"]["budget"] == 0.5
    m2, _ = kvtool.load(tmp_path / "exp")
    assert active_compression(m2).budget == 0.5
    c = DynamicCache(config=m2.config)
    m2(_ids(t=30), **cache_kwargs(m2, c))
    with sharing(m, plan):
        uncompressed = prefill_kv_bytes(m, _ids(t=30))
    assert c.layers[0].keys.shape[-2] == 15 and kv_bytes(c) < uncompressed
    m3, _ = kvtool.load(tmp_path / "exp", merge=False)
    assert active_compression(m3) is None
    # a plan JSON with bad merge settings is refused on load
    bad = plan.to_json().replace('"method": "kvmerger"', '"method": "zip"')
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(KvtoolError, match="unknown compression method"):
        type(plan).load(tmp_path / "bad.json")


@torch.no_grad()
def test_threshold_mode_uses_calibrated_thresholds_and_stays_dense():
    m = tiny_model("llama")
    T = 40
    lo = CompressionSettings(budget=None, thresholds=[[0.0, 0.0]] * 6, recent=4, heavy=0.0, **ALL_LAYERS)
    hi = CompressionSettings(budget=None, thresholds=[[0.9, 0.9]] * 6, recent=4, heavy=0.0, **ALL_LAYERS)
    kept = []
    for st in (lo, hi):
        with compression(m, st):
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
