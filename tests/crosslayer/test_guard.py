"""Sharing never silently turns off: the install-time guard, the run-time keyword check, the KV self-check, remote
code that refuses mismatched weights, and a compressed cache that outlives its context."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama import modeling_llama

import kvtool
import kvtool.crosslayer.attention as sa
from kvtool.compat import cache_kwargs, output_cache
from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.kv_check import check_kv_in_effect, kv_bytes, layer_bytes
from kvtool.crosslayer.runtime import apply_sharing, sharing
from kvtool.errors import KvtoolError
from kvtool.io.export import export
from kvtool.io.tiny import TINY_ARCHS, save_tiny, tiny_model
from kvtool.merging.hook import merge
from kvtool.merging.methods import METHODS
from tests.helpers import ids as _ids
from tests.helpers import plan_for


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_generate_holds_the_owners_share_and_equals_token_by_token_decoding(arch):
    m = tiny_model(arch, max_position_embeddings=512)
    plan = plan_for(m)
    ids = _ids(1, 6)
    L = m.config.num_hidden_layers
    with sharing(m, plan):
        out = m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        cache = output_cache(out)
        # 6 + 7 tokens seen: each owner holds 13 entries (a sliding-window layer at most window - 1) of 2 heads x
        # 16 dims, K and V, float32; consumers hold nothing
        types, window = layer_types(m.config), getattr(m.config, "sliding_window", None)
        entries = [0 if j in plan.consumers else min(13, window - 1) if types[j] == "sliding_attention" else 13
                   for j in range(L)]
        assert layer_bytes(cache) == [n * 2 * 16 * 2 * 4 for n in entries]
        assert sum(entries) > 0
        # token by token through an explicit cache gives the same greedy continuation
        c = DynamicCache(config=m.config)
        logits = m(ids, use_cache=True, **cache_kwargs(m, c)).logits[:, -1]
        toks = []
        for _ in range(8):
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            logits = m(nxt, use_cache=True, **cache_kwargs(m, c)).logits[:, -1]
        assert torch.equal(torch.cat(toks, 1), out.sequences[:, 6:])
        assert 0 < check_kv_in_effect(m) < 1  # raises unless every layer holds exactly what the plan implies


def test_install_refuses_an_attention_forward_without_a_known_cache_argument(monkeypatch):
    m = tiny_model("llama")

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    with pytest.raises(KvtoolError) as e:
        apply_sharing(m, plan_for(m))
    msg = str(e.value)
    assert "\n" not in msg and transformers.__version__ in msg and sa.TESTED_TRANSFORMERS in msg
    assert "LlamaAttention.forward takes no cache argument" in msg
    assert not hasattr(m, "_kvtool_state") and m.model.layers[0].self_attn.__dict__.get("forward") is None


def test_a_cache_under_an_unknown_keyword_is_an_error():
    m = tiny_model("llama")
    apply_sharing(m, plan_for(m))
    attn = m.model.layers[0].self_attn
    h = torch.zeros(1, 3, m.config.hidden_size)
    pos = m.model.rotary_emb(h, torch.arange(3)[None])
    with pytest.raises(sa.SharingRuntimeError, match="'kv_store', a keyword"):
        attn(h, position_embeddings=pos, kv_store=DynamicCache(config=m.config))
    # both known keywords work, and the cache is updated either way
    for kw in ("cache", "past_key_values"):
        c = DynamicCache(config=m.config)
        attn(h, position_embeddings=pos, **{kw: c})
        assert c.layers[0].keys.shape[-2] == 3


def _drop_cache(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kw):
    """The 5.24 bug, re-enacted: a forward that never sees the cache."""
    return _ORIGINAL(self, hidden_states, position_embeddings, attention_mask, None, None, **kw)


_ORIGINAL = sa.attention_forward


def test_load_eval_and_generate_refuse_a_runtime_that_stores_no_kv(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvtool.cli import app

    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    plan.save(tmp_path / "plan.json")
    monkeypatch.setattr(sa, "attention_forward", _drop_cache)
    with pytest.raises(KvtoolError, match=r"sharing is not in effect: the model holds 0\.00 of the base KV, the plan "
                                          r"says 0\.50"):
        kvtool.load(tmp_path / "exp")
    with pytest.raises(KvtoolError, match="not in effect"):
        kvtool.load(d, plan=tmp_path / "plan.json")
    runner = CliRunner()
    for args in (["generate", str(tmp_path / "exp"), "hi", "--raw"],
                 ["eval", "--plan", str(tmp_path / "plan.json"), "--model", str(d), "--tasks", "ppl"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "sharing is not in effect" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
@torch.no_grad()
def test_remote_code_generate_equals_kvtool_load(arch, tmp_path):
    d = save_tiny(tmp_path / "base", arch)
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    ours, _ = kvtool.load(tmp_path / "exp")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True).eval()
    ids = _ids(2, 7)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True,
              pad_token_id=0)
    a, b = ours.generate(ids, **kw), remote.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert kv_bytes(output_cache(a)) == kv_bytes(output_cache(b)) > 0
    assert [type(x).__name__ for x in output_cache(b).layers].count("DummyLayer") == len(plan.consumers)


def test_remote_code_refuses_weights_that_do_not_match_its_map(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    export(plan_for(m), model=m, tokenizer=tok, out=tmp_path / "exp")
    other = [0, 1, 2, 2, 4, 4]  # layers 3 and 5 read, 2 and 4 own: weights for 3/5 exist, for 4 do not
    for name in ("config.json", "kvtool.json"):
        d_ = json.loads((tmp_path / "exp" / name).read_text())
        (d_["plan"] if name == "kvtool.json" else d_)["kv_source_layers"] = other
        (tmp_path / "exp" / name).write_text(json.dumps(d_))
    with pytest.raises(RuntimeError, match="do not match the sharing map.*missing keys.*layers.4.self_attn"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True)
    with pytest.raises(KvtoolError, match="do not match the sharing map"):
        kvtool.load(tmp_path / "exp")


@torch.no_grad()
def test_remote_code_refuses_an_unsupported_transformers(tmp_path, monkeypatch):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    export(plan_for(m), model=m, tokenizer=tok, out=tmp_path / "exp")

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    with pytest.raises(RuntimeError, match="cannot run on transformers .*no cache argument"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_decoding_after_the_merge_block(method):
    m = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    settings = dict(method=method, budget=0.5, protected_layers=[])
    c_in, c_out = DynamicCache(config=m.config), DynamicCache(config=m.config)
    with merge(m, **settings):
        m(ids, attention_mask=mask, **cache_kwargs(m, c_in))
        m(ids, attention_mask=mask, **cache_kwargs(m, c_out))
        step, am = torch.tensor([[5], [6]]), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        inside = m(step, attention_mask=am, **cache_kwargs(m, c_in)).logits
    # the block is over, the cache compressed in it still decodes, to the same result
    after = m(step, attention_mask=am, **cache_kwargs(m, c_out)).logits
    torch.testing.assert_close(after, inside)
    out = m.generate(torch.cat([ids, step], 1), attention_mask=am, max_new_tokens=3, do_sample=False,
                     **cache_kwargs(m, c_out))
    assert out.shape == (2, 44)
    # once every compressed cache is gone, the model is restored (no runtime left behind)
    del c_in, c_out, out
    with merge(m, **settings):
        pass
    assert not hasattr(m, "_kvtool_state")


@torch.no_grad()
def test_a_compressed_cache_without_the_runtime_is_a_clear_error():
    from kvtool.crosslayer.runtime import remove_sharing

    m = tiny_model("llama")
    ids = _ids(1, 40)
    c = DynamicCache(config=m.config)
    with merge(m, method="h2o", budget=0.5, protected_layers=[]):
        m(ids, **cache_kwargs(m, c))
    remove_sharing(m)  # the user takes kvtool's runtime off while still holding the compressed cache
    with pytest.raises(KvtoolError, match="compressed by kvtool.*kvtool.merge"):
        m(torch.tensor([[5]]), **cache_kwargs(m, c))


def test_declared_transformers_range_is_the_tested_one():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    declared = re.search(r'"transformers([^"]+)"', text).group(1)
    assert declared == sa.TESTED_TRANSFORMERS
    constraints = (Path(__file__).parents[2] / "constraints.txt").read_text()
    pinned = re.search(r"^transformers==(\S+)", constraints, re.M).group(1)
    from packaging.specifiers import SpecifierSet

    assert pinned in SpecifierSet(sa.TESTED_TRANSFORMERS)


def test_doctor_passes_and_fails_with_one_line_on_an_unsupported_signature(monkeypatch):
    from typer.testing import CliRunner

    from kvtool.cli import app
    from kvtool.doctor import doctor

    checks = doctor()
    assert checks and all(c.ok for c in checks) and {c.arch for c in checks} >= {"llama", "gemma3_text", "phi3"}

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and "llama install" in last[0] and "no cache argument" in last[0]
