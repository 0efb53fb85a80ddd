"""The KVMerger tensor algorithm and the eviction methods, on hand-built rows."""

from __future__ import annotations

import pytest
import torch

from kvtool.merging.methods import H2O, PromptKV, Streaming
from kvtool.merging.methods.kvmerger import (
    gaussian_merge,
    merge_head,
    merge_rows,
    pair_scores,
    protected_mask,
    select_pairs,
)


def _kept(method, pad, keep, acc=None):
    """Positions an eviction method keeps of rows with this padding (and accumulated attention ``acc``)."""
    R, T = pad.shape
    kv = PromptKV(torch.zeros(R, T, 2), torch.zeros(R, T, 2), pad, torch.zeros(R, 1, T, 2), None, 1.0)
    if acc is not None:
        kv._attention[0] = acc
    return method.reduce(kv, keep).positions


def test_identical_keys_merge_to_that_key():
    k = torch.tensor([[[1.0, 2.0]] * 4])
    v = torch.arange(8.0).view(1, 4, 2)
    acc = torch.tensor([[0.1, 0.9, 0.2, 0.3]])
    mk, mv, pos = gaussian_merge(k, v, acc, torch.tensor([[True, True, True]]), sigma=5.0)
    assert torch.allclose(mk, k[:, :1]) and pos.tolist() == [[1]]
    assert torch.allclose(mv, v.mean(1, keepdim=True))  # equal distances: equal weights


def test_weights_sum_to_one_and_pivot_weighs_most():
    torch.manual_seed(0)
    k = torch.randn(1, 5, 8)
    v = torch.eye(5, 8)[None]  # value i is a unit vector, so the merged value lists the weights
    acc = torch.tensor([[0.1, 0.2, 3.0, 0.4, 0.5]])
    _, mv, pos = gaussian_merge(k, v, acc, torch.ones(1, 4, dtype=torch.bool), sigma=2.0)
    w = mv[0, 0, :5]
    assert pos.tolist() == [[2]]
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert int(w.argmax()) == 2 and torch.all(w > 0)


def test_budget_is_met_exactly_and_protected_tokens_stay():
    torch.manual_seed(1)
    T, D = 64, 16
    k, v = torch.randn(T, D), torch.randn(T, D)
    acc = torch.rand(T)
    for keep in (40, 32, 22):
        r = merge_head(k, v, acc, keep, sinks=2, recent=8, heavy=4)
        assert r.keys.shape == (keep, D) and r.positions.shape == (keep,)
        assert torch.all(r.positions[1:] > r.positions[:-1])
        prot = protected_mask(acc[None], 2, 8, 4)[0].nonzero().flatten()
        assert set(prot.tolist()) <= set(r.positions.tolist())


def test_most_similar_pairs_merge_first_and_threshold_is_the_last_one():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.03], [0.0, 1.0], [-1.0, 0.0]]])
    score = pair_scores(keys, torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool))
    chosen, thr = select_pairs(score, keep=3)
    assert chosen.tolist() == [[True, True, False, False]]
    assert float(thr[0]) == pytest.approx(float(score[0, 1]))


def test_threshold_mode_merges_pairs_above_eps():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.03], [0.0, 1.0], [-1.0, 0.0]]])
    r = merge_rows(keys, keys, torch.rand(1, 5), None, eps=0.9, sinks=0, recent=0)
    assert r.keys.shape[1] == 3  # tokens 0-2 are one set; 3 and 4 stay


def test_padding_merges_only_with_padding():
    torch.manual_seed(2)
    k = torch.randn(2, 12, 4)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, :5] = True
    r = merge_rows(k, k, torch.rand(2, 12), 6, pad=pad, sinks=1, recent=1)
    assert r.keys.shape == (2, 6, 4)
    assert pad[0, r.positions[0]].tolist() == [True] + [False] * 5  # five pad tokens became one entry


def test_budget_one_keeps_everything():
    k, v = torch.randn(10, 4), torch.randn(10, 4)
    r = merge_head(k, v, torch.rand(10), keep=10)
    assert torch.equal(r.keys, k) and torch.equal(r.values, v) and r.positions.tolist() == list(range(10))


def test_streaming_keeps_sinks_and_recent_and_h2o_keeps_heavy_hitters():
    pad = torch.zeros(1, 20, dtype=torch.bool)
    pad[0, :2] = True
    assert _kept(Streaming(sinks=3), pad, 8).tolist() == [[2, 3, 4, 15, 16, 17, 18, 19]]
    acc = torch.zeros(1, 20)
    acc[0, [6, 9, 11]] = torch.tensor([3.0, 2.0, 1.0])
    acc[0, 0] = 99.0  # padding is never kept while real tokens remain
    assert _kept(H2O(), pad, 6, acc).tolist() == [[6, 9, 11, 17, 18, 19]]
