"""CPU smoke test of bench/gpu_serving.py on the tiny preset: the numbers it reports are the ones the map implies."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def gs(monkeypatch):
    """bench/gpu_serving.py as a module, with bench/ on the path as when it runs as a script (for bench/common.py)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_serving")


def test_parse_size(gs):
    assert gs.parse_size("8GiB") == 8 * 2**30
    assert gs.parse_size("512MiB") == 512 * 2**20
    assert gs.parse_size("1.5GB") == 1_500_000_000
    assert gs.parse_size("4096") == 4096
    with pytest.raises(Exception, match="cannot read"):
        gs.parse_size("8 gigs")


def test_tiny_cpu_run(gs, tmp_path, capsys):
    out = tmp_path / "sub" / "serving.json"
    prompt, new, budget = 64, 8, 4 * 2**20
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and they spin when the CPU is busy
    try:
        report = gs.main(["--preset", "tiny", "--prompt", str(prompt), "--new", str(new), "--batch", "2",
                          "--kv-budget", "4MiB", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "shared/base" in printed and "KV bytes per sequence" in printed and "transformers" in printed

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (p,) = report["presets"]
    cfg = gs.PRESETS["tiny"]
    L, c = cfg["num_hidden_layers"], len(p["consumers"])
    assert p["layers"] == L and c == round(0.3 * L) == 2
    base, shared = p["base"], p["shared"]

    # KV per sequence: every layer holds prompt + new entries of K and V (float32), consumers hold none
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_layer = (prompt + new) * 2 * cfg["num_key_value_heads"] * head_dim * 4
    assert base["kv_bytes_per_seq"] == L * per_layer
    assert shared["kv_bytes_per_seq"] == (L - c) * per_layer
    assert p["ratios"]["kv_bytes_per_seq"] == (L - c) / L
    assert shared["kv_share_checked"] == pytest.approx((L - c) / L) and base["kv_share_checked"] == 1.0

    # max batch in the budget, confirmed by a run whose cache holds exactly that many sequences, within the budget
    for v in (base, shared):
        assert v["max_batch"] == budget // v["kv_bytes_per_seq"] >= 1
        assert v["max_batch_kv_bytes"] == v["max_batch"] * v["kv_bytes_per_seq"] <= budget
        assert (v["max_batch"] + 1) * v["kv_bytes_per_seq"] > budget
        for key in ("prefill_s", "decode_tok_s", "max_batch_prefill_s", "max_batch_decode_tok_s"):
            assert v[key] > 0, key
        assert "gpu" not in v
    assert shared["max_batch"] > base["max_batch"]
    assert p["ratios"]["max_batch"] == shared["max_batch"] / base["max_batch"]
    assert p["ratios"]["limit_layers_over_owners"] == L / (L - c)
    for key in ("prefill_s", "decode_tok_s_equal_batch", "decode_tok_s_max_batch"):
        assert p["ratios"][key] > 0, key
        assert p["ratio_spreads"][key]["n"] == 1  # one round: the range is that round's ratio
