"""Issue 8: local damage scores, best-first search, KL validation, heal."""

from __future__ import annotations

import pytest
import torch

import kvtool
from kvtool.calibration.calibrate import calibrate
from kvtool.crosslayer.runtime import active_plan
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.heal import HealSettings, heal, sample_chunks, trainable_parameters
from kvtool.io.loading import model_origin
from kvtool.io.tiny import save_tiny, tiny_model, tiny_tokenizer
from kvtool.search import search
from kvtool.search.local_scores import local_errors
from kvtool.search.orders import rank_pairs


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@torch.no_grad()
def _measured_error(m, ids, i, j) -> float:
    """Layer j's attention-output change when it reads i, relative to its residual input, from real forwards."""
    got = {}
    layer = m.model.layers[j]
    h1 = layer.register_forward_pre_hook(lambda _m, a, kw: got.__setitem__("h", (a[0] if a else kw["hidden_states"])),
                                         with_kwargs=True)
    h2 = layer.self_attn.register_forward_hook(lambda _m, a, o: got.__setitem__("o", o[0]))
    try:
        m.model(input_ids=ids)
        own, resid = got["o"], got["h"]
        with kvtool.sharing(m, SharingPlan.from_pairs(m.config.num_hidden_layers, {j: i})):
            m.model(input_ids=ids)
        other = got["o"]
    finally:
        h1.remove()
        h2.remove()
    return float(((other - own).norm(dim=-1) / resid.norm(dim=-1)).mean())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_local_errors_match_real_single_pair_forwards(arch, tok):
    m = tiny_model(arch)
    st = calibrate(m, tokenizer=tok, samples=4, seq_len=20, batch_size=4)
    err = local_errors(m, st.input_ids, samples=4)
    types = st.meta["layer_types"]
    pairs = [(i, j) for j in range(1, 6) for i in range(j) if types[i] == types[j]]
    hand = {p: _measured_error(m, st.input_ids, *p) for p in pairs}
    for p in pairs:
        assert float(err[p]) == pytest.approx(hand[p], rel=1e-3, abs=1e-5)
    assert rank_pairs(err, types, "local") == sorted(pairs, key=lambda p: hand[p])
    assert all(not torch.isfinite(err[i, j]) for i in range(6) for j in range(6) if (i, j) not in hand)


def test_local_and_best_first_orders(tok):
    m = tiny_model("llama", num_hidden_layers=8)
    st = calibrate(m, tokenizer=tok, samples=6, seq_len=24, batch_size=4)
    loc = search(st, model=m, layers=3, order="local", threshold=10.0)
    assert loc.plan.details["validate"] == "kl" and len(loc.plan.consumers) == 3
    bf = search(st, model=m, layers=3, order="best-first", beam=3, threshold=10.0)
    assert len(bf.plan.consumers) == 3 and bf.plan.details["beam"] == 3
    steps = {}
    for t in bf.tries:
        steps.setdefault(t["step"], []).append(t)
    assert len(steps) == 3 and all(len(v) <= 3 for v in steps.values())
    for v in steps.values():  # the accepted candidate of each step has the lowest KL of that step
        kept = [t for t in v if t["accepted"]]
        assert len(kept) == 1 and kept[0]["score"] == min(t["score"] for t in v)
    with pytest.raises(KvtoolError, match="guard"):
        search(st, model=m, layers=3, order="best-first", beam=3, threshold=0.0)
    strict = search(st, model=m, layers=3, order="best-first", beam=3, threshold=0.0, allow_partial=True)
    assert strict.exhausted and strict.plan.consumers == []


def test_heal_lowers_validation_loss_and_writes_a_loadable_dir(tmp_path, tok):
    d = save_tiny(tmp_path / "base", "llama", num_hidden_layers=6)
    m, t = kvtool.load(d)
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = heal(plan, out=tmp_path / "healed", model=m, tokenizer=t,
               settings=HealSettings(steps=40, lr=3e-3, samples=16, seq_len=32, val_samples=4, eval_every=10,
                                     patience=10))
    assert res["val_kl_after"] < res["val_kl_before"]
    trained = {id(p) for p in trainable_parameters(m, plan)}
    for n, p in m.named_parameters():  # only consumer q/o projections moved
        if id(p) not in trained and n in before:
            assert torch.equal(p, before[n]), n
    h, htok = kvtool.load(tmp_path / "healed")
    assert model_origin(h).sidecar["heal"]["val_kl_after"] == res["val_kl_after"]
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(h(ids).logits, m(ids).logits, atol=1e-5, rtol=0)
    # a healed dir re-exports (here to bfloat16) with its map and heal record
    from kvtool.io.export import export

    export(None, model=h, tokenizer=htok, out=tmp_path / "re", dtype="bfloat16")
    r, _ = kvtool.load(tmp_path / "re")
    assert model_origin(r).sidecar["heal"] and active_plan(r).kv_source_layers == plan.kv_source_layers


def test_heal_sources_trains_the_read_kv_projections_and_loads(tmp_path, tok):
    d = save_tiny(tmp_path / "base", "llama", num_hidden_layers=6)
    m, t = kvtool.load(d)
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    names = {id(p): n for n, p in m.named_parameters()}
    picked = {names[id(p)] for p in trainable_parameters(m, plan, "sources")}
    assert {f"model.layers.{i}.self_attn.{w}_proj.weight" for i in (1, 3) for w in "kv"} <= picked
    assert not any(n.startswith("model.layers.0.") for n in picked)
    assert not any(f"layers.{j}.self_attn.{w}_proj" in n for j in (2, 4, 5) for w in "kv" for n in picked)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = heal(plan, out=tmp_path / "healed", model=m, tokenizer=t,
               settings=HealSettings(steps=20, lr=3e-3, samples=16, seq_len=32, val_samples=4, eval_every=5,
                                     patience=10, train="sources"))
    assert res["trained"] == "sources" and res["val_kl_after"] < res["val_kl_before"]
    assert not torch.equal(m.model.layers[1].self_attn.k_proj.weight, before["model.layers.1.self_attn.k_proj.weight"])
    h, _ = kvtool.load(tmp_path / "healed")
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(h(ids).logits, m(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(KvtoolError, match="unknown heal target"):
        trainable_parameters(m, plan, "everything")


def test_heal_on_sampled_text_keeps_the_validation_split(tmp_path, tok):
    d = save_tiny(tmp_path / "base", "llama", num_hidden_layers=4)
    m, t = kvtool.load(d)
    prompts = torch.randint(3, 128, (3, 24))
    g = sample_chunks(m, t, prompts, 5, seed=0, batch_size=2, prompt_len=6)
    assert g.shape == (5, 24)
    assert torch.equal(g[:, :6], prompts[torch.arange(5) % 3, :6])  # each row continues a prompt row
    plan = SharingPlan([0, 0, 2, 3])
    kw = dict(steps=4, lr=3e-3, samples=8, seq_len=24, val_samples=4, eval_every=2, patience=10)
    plain = heal(plan, out=tmp_path / "a", model=kvtool.load(d)[0], tokenizer=t, settings=HealSettings(**kw))
    more = heal(plan, out=tmp_path / "b", model=kvtool.load(d)[0], tokenizer=t,
                settings=HealSettings(**kw, generated=6))
    assert more["val_kl_before"] == plain["val_kl_before"]  # same validation chunks, same starting point
    assert model_origin(kvtool.load(tmp_path / "b")[0]).sidecar["heal"]["settings"]["generated"] == 6
