"""attnmerge: keep by the last queries' attention, merge the dropped tokens into their most similar kept one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.kv_check import kv_bytes
from kvtool.crosslayer.runtime import sharing
from kvtool.errors import KvtoolError
from kvtool.io.tiny import tiny_model
from kvtool.merging.compressed_cache import CompressedLayer
from kvtool.merging.hook import merge
from kvtool.merging.methods import METHODS, AttnMerge, PromptKV, ScoredEviction, make_method, method_from_dict
from kvtool.merging.rows import window_attention
from tests.helpers import ALL_LAYERS, ids, left_padded, plan_for


def attn_merge_rows(k, v, score, keep, *, pad=None, merge=True, pool=1, min_similarity=0.0, **fields):
    """attnmerge on rows whose score is given (the window attention stood in by ``score``)."""
    R, T, D = k.shape
    pad = torch.zeros(R, T, dtype=torch.bool) if pad is None else pad
    kv = PromptKV(k, v, pad, torch.zeros(R, 1, T, D), _causal(R, T), 1.0)
    m = AttnMerge(budget=0.5, pool=pool, min_similarity=min_similarity, **fields).validate()
    kv._attention[m.window] = score
    return m.reduce(kv, keep) if merge else ScoredEviction.reduce(m, kv, keep)


def _causal(B, T):
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)


def test_window_scores_are_h2o_at_zero_and_tova_at_one():
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 12, 8
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    allowed = _causal(B, T)
    full = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    h2o = torch.softmax(full.masked_fill(~allowed, -float("inf")), -1).sum(2)  # every query's attention, summed
    assert torch.allclose(window_attention(q, k, allowed, 0.3, 0), h2o.view(B, Hkv, 2, T).sum(2), atol=1e-5)
    last = torch.softmax((q[:, :, -1:] @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3, -1)[:, :, 0]
    assert torch.allclose(window_attention(q, k, allowed, 0.3, 1), last.view(B, Hkv, 2, T).sum(2), atol=1e-6)
    w = window_attention(q, k, allowed, 0.3, 5)
    assert torch.allclose(w.sum(-1), torch.full((B, Hkv), 5.0 * 2))  # 5 queries × 2 heads, each row sums to 1


def test_exact_count_sinks_recent_and_best_scored_are_kept():
    torch.manual_seed(1)
    R, T, D = 3, 40, 8
    k, v = torch.randn(R, T, D), torch.randn(R, T, D)
    score = torch.rand(R, T) * 0.1
    score[:, 10] = 5.0  # a heavy hitter
    for keep in (20, 16):  # recent tokens protected: at most a quarter of the kept entries
        r = attn_merge_rows(k, v, score, keep, sinks=2, recent=4)
        assert r.keys.shape == (R, keep, D) and r.values.shape == (R, keep, D) and r.sizes.shape == (R, keep)
        assert torch.all(r.positions[:, 1:] > r.positions[:, :-1])
        for row in r.positions.tolist():
            assert {0, 1, 10, 36, 37, 38, 39} <= set(row)
        assert torch.equal(r.keys, k.gather(1, r.positions[..., None].expand(R, keep, D)))  # keys stay


def test_eviction_when_nothing_is_similar_enough():
    torch.manual_seed(2)
    k, v = torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    score = torch.rand(2, 30)
    r = attn_merge_rows(k, v, score, 12, sinks=1, recent=2, min_similarity=1.0)
    assert torch.equal(r.values, v.gather(1, r.positions[..., None].expand(2, 12, 8)))
    assert torch.equal(r.sizes, torch.ones(2, 12))
    off = attn_merge_rows(k, v, score, 12, sinks=1, recent=2, merge=False)
    assert torch.equal(off.values, r.values) and torch.equal(off.positions, r.positions)


def test_values_merge_by_attention_mass_into_the_most_similar_kept_key():
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 0.0]]])
    score = torch.tensor([[1.0, 2.0, 0.8, 0.5]])
    r = attn_merge_rows(k, v, score, 2, sinks=0, recent=0)
    assert r.positions.tolist() == [[0, 1]]
    # token 2 (mass 0.4 of token 1's) joins token 1; token 3 (mass 0.5 of token 0's) joins token 0
    assert torch.allclose(r.sizes, torch.tensor([[1.5, 1.4]]))
    assert torch.allclose(r.values[0, 0], torch.tensor([(1.0 + 0.5 * 5.0) / 1.5, 0.0]))
    assert torch.allclose(r.values[0, 1], torch.tensor([0.0, (1.0 + 0.4 * 3.0) / 1.4]))
    assert torch.equal(r.keys, k[:, :2])
    rk = attn_merge_rows(k, v, score, 2, sinks=0, recent=0, merge_keys=True)
    assert torch.allclose(rk.keys[0, 1], torch.tensor([0.04 / 1.4, 1.0]))


def test_size_bias_makes_a_run_of_duplicates_attend_exactly_as_before():
    torch.manual_seed(3)
    T, D = 16, 8
    k, v = torch.randn(1, T, D), torch.randn(1, T, D)
    k[:, 4:9], v[:, 4:9] = k[:, 4:5], v[:, 4:5]  # five identical tokens, seen alike by the observation queries
    score = torch.rand(1, T) + 1.0
    score[:, 4:9] = 0.5
    score[:, 4] = 0.5 + 1e-3  # the kept one
    r = attn_merge_rows(k, v, score, T - 4, sinks=0, recent=0)
    assert 4 in r.positions[0].tolist() and not {5, 6, 7, 8} & set(r.positions[0].tolist())
    q = torch.randn(3, D)
    full = torch.softmax(q @ k[0].T, -1) @ v[0]
    comp = torch.softmax(q @ r.keys[0].T + r.sizes[0].log(), -1) @ r.values[0]
    assert torch.allclose(full, comp, atol=1e-3)


def test_padding_stays_leading_and_never_merges():
    torch.manual_seed(4)
    R, T, D = 2, 16, 4
    k, v = torch.randn(R, T, D), torch.randn(R, T, D)
    pad = torch.zeros(R, T, dtype=torch.bool)
    pad[0, :10] = True  # 6 real tokens: a budget of 8 keeps two pads
    r = attn_merge_rows(k, v, torch.rand(R, T), 8, pad=pad, sinks=1, recent=1)
    assert pad[0, r.positions[0]].tolist() == [True, True] + [False] * 6
    assert torch.equal(r.values[0, :2], v[0, r.positions[0, :2]])
    assert r.sizes[0, :2].tolist() == [1.0, 1.0]


def test_settings_know_the_method_and_check_its_fields():
    assert "attnmerge" in METHODS and "kvmerger" in METHODS
    s = method_from_dict({"method": "attnmerge", "budget": 0.35, "window": 16, "pool": 1})
    assert s.to_dict()["window"] == 16
    for bad in ({"budget": None}, {"pool": 0}, {"mix": -1.0}, {"window": "64"}, {"merge_keys": 1}):
        with pytest.raises(KvtoolError):
            make_method("attnmerge", **bad)
    assert make_method().name == "kvmerger"  # the paper's method stays the default
    k, a = make_method(), make_method("attnmerge")
    assert (k.size_bias, k.protected_layers) == (False, None)  # KVMerger: first two and last layer whole
    assert (a.size_bias, a.protected_layers) == (True, [])  # attnmerge's own defaults
    assert make_method("attnmerge", protected_layers=[0], size_bias=False).protected_layers == [0]
    assert not hasattr(make_method("h2o"), "window")  # a method holds only its own settings


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("extra", [{}, {"size_bias": False}, {"merge_keys": True, "window": 0, "pool": 1},
                                   {"mix": 1.0}])
@torch.no_grad()
def test_composes_with_sharing_at_an_exact_budget(arch, extra):
    m = tiny_model(arch)
    plan = plan_for(m)
    x, mask = left_padded(30, 6)
    with sharing(m, plan), merge(m, method="attnmerge", budget=0.5, **ALL_LAYERS, **extra):
        out = m.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert out.shape == (2, 35)
        c = DynamicCache(config=m.config)
        m(x, attention_mask=mask, **cache_kwargs(m, c))
        for i, layer in enumerate(c.layers):
            if isinstance(layer, CompressedLayer) and layer.compressed:
                assert plan.kv_source_layers[i] == i and layer.keys.shape[-2] == math.floor(0.5 * 30)
                assert (layer.log_sizes is not None) == extra.get("size_bias", True)
        step = torch.tensor([[5], [6]])
        logits = m(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                   **cache_kwargs(m, c)).logits
        assert torch.isfinite(logits).all()


@torch.no_grad()
def test_budget_one_is_bit_identical_and_half_halves_the_bytes():
    m = tiny_model("llama")
    x = ids(t=40)
    c0 = DynamicCache(config=m.config)
    base = m(x, **cache_kwargs(m, c0)).logits
    with merge(m, method="attnmerge", budget=1.0, size_bias=True, **ALL_LAYERS):
        c1 = DynamicCache(config=m.config)
        assert torch.equal(m(x, **cache_kwargs(m, c1)).logits, base)
    with merge(m, method="attnmerge", budget=0.5, size_bias=True, **ALL_LAYERS):
        c2 = DynamicCache(config=m.config)
        m(x, **cache_kwargs(m, c2))
        assert kv_bytes(c2) == kv_bytes(c0) // 2
