"""The KVMerger tensor algorithm (cache integration is not part of this version)."""

from __future__ import annotations

import pytest
import torch

from kvtool.merge import gaussian_merge, merge_head, protected_mask, select_pairs


def test_identical_keys_merge_to_that_key():
    k = torch.tensor([[1.0, 2.0]] * 4)
    v = torch.arange(8.0).view(4, 2)
    acc = torch.tensor([0.1, 0.9, 0.2, 0.3])
    mk, mv, pos = gaussian_merge(k, v, acc, torch.tensor([True, True, True]), sigma=5.0)
    assert torch.allclose(mk, k[:1]) and pos.tolist() == [1]
    assert torch.allclose(mv, v.mean(0, keepdim=True))  # equal distances: equal weights


def test_weights_sum_to_one_and_pivot_weighs_most():
    torch.manual_seed(0)
    k = torch.randn(5, 8)
    v = torch.eye(5, 8)  # value i is a unit vector, so the merged value lists the weights
    acc = torch.tensor([0.1, 0.2, 3.0, 0.4, 0.5])
    _, mv, pos = gaussian_merge(k, v, acc, torch.ones(4, dtype=torch.bool), sigma=2.0)
    w = mv[0, :5]
    assert pos.tolist() == [2]
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert int(w.argmax()) == 2 and torch.all(w > 0)


def test_budget_is_met_exactly_and_protected_tokens_stay():
    torch.manual_seed(1)
    T, D = 64, 16
    k, v = torch.randn(T, D), torch.randn(T, D)
    acc = torch.rand(T)
    for keep in (40, 32, 22):
        r = merge_head(k, v, acc, keep, eps=0.99, sinks=2, recent=8, heavy=4)
        assert r.keys.shape == (keep, D) and r.positions.shape == (keep,)
        assert torch.all(r.positions[1:] > r.positions[:-1])
        prot = protected_mask(acc, 2, 8, 4).nonzero().flatten()
        assert set(prot.tolist()) <= set(r.positions.tolist())


def test_threshold_above_eps_merges_only_to_budget():
    sim = torch.tensor([0.99, 0.98, 0.97, 0.1])
    chosen, thr = select_pairs(sim, torch.zeros(5, dtype=torch.bool), keep=3, eps=0.5)
    assert chosen.tolist() == [True, True, False, False] and thr == pytest.approx(0.98)


def test_budget_one_keeps_everything():
    k, v = torch.randn(10, 4), torch.randn(10, 4)
    r = merge_head(k, v, torch.rand(10), keep=10)
    assert torch.equal(r.keys, k) and torch.equal(r.values, v) and r.positions.tolist() == list(range(10))
