from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtool.calibration.calibrate import calibrate, layer_distances
from kvtool.compat import cache_kwargs
from kvtool.errors import KvtoolError
from kvtool.formats.stats import CalibrationStats, sim_fraction_above
from kvtool.io.tiny import TINY_ARCHS, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stats_shapes_on_every_architecture(arch, tok, tmp_path):
    m = tiny_model(arch)
    stats = calibrate(m, tokenizer=tok, samples=6, seq_len=16, batch_size=4, out=tmp_path / "c")
    L, H = m.config.num_hidden_layers, m.config.num_key_value_heads
    D = m.model.layers[0].self_attn.head_dim
    assert stats.tensors["k_mean"].shape == (L, H, 16, D)
    assert stats.tensors["final_hidden"].shape == (6, 16, m.config.hidden_size)
    for kind in ("euclidean", "kvsharer", "cosine"):
        d = stats.distance(kind)
        assert d.shape == (L, L)
        torch.testing.assert_close(d, d.T)
        assert torch.all(d.diagonal().abs() < 1e-3)
    again = CalibrationStats.load(tmp_path / "c")
    assert again.meta["num_layers"] == L and again.meta["layer_types"]
    assert (tmp_path / "c" / "distance_heatmap.png").stat().st_size > 1000


@torch.no_grad()
def test_averages_match_the_cache_of_plain_forwards(tok):
    """The averaged K (after RoPE) and V equal those a DynamicCache holds after ordinary forwards."""
    m = tiny_model("llama")
    stats = calibrate(m, tokenizer=tok, samples=4, seq_len=12, batch_size=3)
    ids = stats.input_ids
    cache = DynamicCache(config=m.config)
    m(ids, **cache_kwargs(m, cache), use_cache=True)
    for layer in (0, 3, 5):
        torch.testing.assert_close(stats.tensors["k_mean"][layer], cache.layers[layer].keys.mean(0), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(stats.tensors["v_mean"][layer], cache.layers[layer].values.mean(0), atol=1e-5,
                                   rtol=1e-5)
    torch.testing.assert_close(stats.final_hidden, m.model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    # consecutive-key similarity histogram counts every adjacent pair once
    assert int(stats.tensors["keysim_hist"][0].sum()) == 4 * 11 * m.config.num_key_value_heads


def test_distance_definitions_by_hand():
    k = torch.zeros(3, 1, 2, 2)
    v = torch.zeros(3, 1, 2, 2)
    k[1, 0, 0] = torch.tensor([3.0, 4.0])  # layer 1 differs from 0 in one token of K by a vector of norm 5
    v[2] = 1.0  # layer 2: every V entry is 1 -> per-token L2 = sqrt(2)
    d = layer_distances(k, v)
    assert d["euclidean"][0, 1] == pytest.approx(5.0)
    assert d["euclidean"][0, 2] == pytest.approx(2.0)  # sqrt(4 ones)
    assert d["kvsharer"][0, 1] == pytest.approx((5.0 / 2) / 2)  # mean over 2 tokens, (dK + 0) / 2
    assert d["kvsharer"][0, 2] == pytest.approx(2**0.5 / 2)
    assert d["cosine"][1, 2] == pytest.approx(1.0)  # orthogonal supports


def test_fraction_above_from_histogram():
    from kvtool.formats.stats import SIM_BINS

    hist = torch.zeros(SIM_BINS, dtype=torch.long)
    hist[-1] = 3  # similarity ~1
    hist[SIM_BINS // 2] = 1  # similarity ~0
    assert sim_fraction_above(hist, 0.75).item() == pytest.approx(0.75)


def test_refuses_existing_dir(tok, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("user data")
    with pytest.raises(KvtoolError, match="--force"):
        calibrate(tiny_model("llama"), tokenizer=tok, samples=2, seq_len=8, out=tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_smollm2_calibration(smollm2, tmp_path):
    model, tok = smollm2
    stats = calibrate(model, tokenizer=tok, samples=8, seq_len=64, out=tmp_path / "c")
    assert stats.num_layers == 30
    assert stats.distance("euclidean").shape == (30, 30)
    assert stats.tensors["k_mean"].shape == (30, 3, 64, 64)
