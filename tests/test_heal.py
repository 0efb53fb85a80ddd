"""Heal: the base model's own corpus (cached, resumable, its targets = the base's distributions), distillation with
every trainable set (LoRA merged at export), the top-k loss, and the CLI's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvtool
from kvtool.calibration.corpus import CorpusSettings, corpus_dir, generated_corpus
from kvtool.cli import app
from kvtool.crosslayer.runtime import active_plan
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.heal import HealSettings, heal, topk_kl, trainable_parameters
from kvtool.io.fingerprint import model_fingerprint
from kvtool.io.loading import model_origin
from kvtool.io.tiny import save_tiny, tiny_model

CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}" \
       "{% if add_generation_prompt %}<s>assistant:{% endif %}"
SMALL = dict(seq_len=96, prompt_tokens=8, batch_size=4, top_k=16)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def base(tmp_path):
    d = save_tiny(tmp_path / "base", "llama", num_hidden_layers=6)
    m, t = kvtool.load(d)
    t.chat_template = CHAT
    return m, t


def test_corpus_targets_are_the_base_distributions_and_the_cache_resumes(base):
    m, t = base
    seen = []
    c = generated_corpus(m, t, CorpusSettings(rows=8, **SMALL), progress=lambda i, n, eta: seen.append((i, n)))
    assert c.ids.shape == (8, 96) and seen[-1] == (2, 2) and c.tokens_per_second > 0
    assert c.mask[:4].all()  # shard 0: plain snippets of exactly prompt_tokens, no padding
    chat = t.decode(c.ids[4][c.mask[4].bool()])
    assert "user:" in chat and "assistant:" in chat  # shard 1: requests in the chat template
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=c.ids, attention_mask=c.mask).logits.float(), -1)
    v, i = lp.topk(16, -1)
    real = c.mask.bool()
    assert torch.equal(i[..., 0][real], c.top[..., 0][real])
    assert (torch.log_softmax(v, -1) - c.logp)[real].abs().max() < 5e-3  # float16 storage
    # prefix-stable and resumable: a larger corpus extends the smaller one; a lost shard comes back identical
    root = corpus_dir(model_fingerprint(m), CorpusSettings(**SMALL))
    (root / "shard-00001.safetensors").unlink()
    big = generated_corpus(m, t, CorpusSettings(rows=12, **SMALL))
    assert big.ids.shape[0] == 12 and torch.equal(big.ids[:8], c.ids) and torch.equal(big.top[:8], c.top)
    again = generated_corpus(m, t, CorpusSettings(rows=12, **SMALL))
    assert again.tokens_per_second is None  # all cached: nothing sampled
    other = generated_corpus(m, t, CorpusSettings(rows=4, **{**SMALL, "seed": 1}))
    assert not torch.equal(other.ids, c.ids[:4])
    with pytest.raises(KvtoolError, match="vocabulary"):
        generated_corpus(m, t, CorpusSettings(rows=4, **{**SMALL, "top_k": 4096}))


def test_topk_loss_equals_the_kl_over_the_teachers_tokens():
    for arch in ("llama", "gemma2"):  # gemma2: final logit softcapping
        m = tiny_model(arch, num_hidden_layers=2)
        ids = torch.randint(3, 100, (2, 12))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        torch.manual_seed(0)
        top = torch.randint(0, m.config.vocab_size, (2, 12, 8))
        logp = torch.log_softmax(torch.randn(2, 12, 8), -1)
        with torch.no_grad():
            full = m(input_ids=ids, attention_mask=mask).logits.float()
            student = torch.log_softmax(full.gather(-1, top), -1)
            want = (logp.exp() * (logp - student)).sum(-1)[mask.bool()].mean()
            torch.testing.assert_close(topk_kl(m, ids, mask, top, logp), want, atol=1e-5, rtol=1e-5)


def test_corpus_targets_are_computed_a_few_rows_at_a_time_with_the_same_result():
    from kvtool.calibration.corpus import _targets

    logits = torch.randn(7, 5, 50)
    top, logp, last = _targets(logits, 6, rows=3)
    lp = torch.log_softmax(logits, -1)
    v, i = lp.topk(6, -1)
    assert torch.equal(top, i) and torch.equal(last, lp[:, -1])
    torch.testing.assert_close(logp, torch.log_softmax(v, -1))


SET = dict(tokens=2400, seq_len=96, batch_size=4, val_rows=4, top_k=16, eval_every=600, patience=10, lr=3e-3,
           sample_batch=4)


def _check_export(m, out, ids):
    h, _ = kvtool.load(out)
    with torch.no_grad():
        torch.testing.assert_close(h(ids).logits, m(ids).logits, atol=1e-5, rtol=0)
    return h


def test_heal_attention_on_generated_text(base, tmp_path):
    m, t = base
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = heal(plan, out=tmp_path / "healed", model=m, tokenizer=t, settings=HealSettings(**SET, train="attention"),
               checkpoints=(800, 1600), checkpoint=lambda n, mm: {"seen": n, "training": mm.training})
    assert res["val_kl_after"] < res["val_kl_before"] and res["tokens_trained"] >= 2400
    assert [c["tokens"] >= want for c, want in zip(res["curve"], (800, 1600), strict=True)] == [True, True]
    assert not any(c["training"] for c in res["curve"])
    assert res["train_tokens_per_second"] > 0 and res["corpus_tokens_per_second"] > 0
    trained = {id(p) for p in trainable_parameters(m, plan)}
    for n, p in m.named_parameters():  # only consumer q/o projections moved
        if id(p) not in trained and n in before:
            assert torch.equal(p, before[n]), n
    h = _check_export(m, tmp_path / "healed", torch.randint(3, 128, (1, 12)))
    assert model_origin(h).sidecar["heal"]["val_kl_after"] == res["val_kl_after"]
    assert active_plan(h).kv_source_layers == plan.kv_source_layers


def test_heal_lora_trains_every_layer_and_merges_into_a_plain_checkpoint(base, tmp_path):
    m, t = base
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = heal(plan, out=tmp_path / "healed", model=m, tokenizer=t, settings=HealSettings(**SET, train="lora",
                                                                                          lora_rank=4))
    assert res["trained"] == "lora" and res["val_kl_after"] < res["val_kl_before"]
    for i in range(6):  # owners' K/V and every layer's q/o moved; nothing else did
        attn = m.model.layers[i].self_attn
        moved = {w for w in "qkvo" if getattr(attn, f"{w}_proj") is not None  # a consumer's K/V are gone
                 and not torch.equal(getattr(attn, f"{w}_proj").weight,
                                     before[f"model.layers.{i}.self_attn.{w}_proj.weight"])}
        assert moved == ({"q", "o"} if i in plan.readers else set("qkvo")), (i, moved)
    assert torch.equal(m.model.layers[2].mlp.up_proj.weight, before["model.layers.2.mlp.up_proj.weight"])
    assert not any(mod._forward_hooks for mod in m.modules())  # merged: no adapter left behind
    _check_export(m, tmp_path / "healed", torch.randint(3, 128, (1, 12)))


def test_heal_sources_and_calibration_text(base, tmp_path):
    m, t = base
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    names = {id(p): n for n, p in m.named_parameters()}
    picked = {names[id(p)] for p in trainable_parameters(m, plan, "sources")}
    assert {f"model.layers.{i}.self_attn.{w}_proj.weight" for i in (1, 3) for w in "kv"} <= picked
    assert not any(n.startswith("model.layers.0.") for n in picked)
    res = heal(plan, out=tmp_path / "healed", model=m, tokenizer=t,
               settings=HealSettings(**SET, train="sources", text="calibration"))
    assert res["trained"] == "sources" and res["val_kl_after"] < res["val_kl_before"]
    assert res["corpus_tokens_per_second"] is None  # no sampling on calibration text
    _check_export(m, tmp_path / "healed", torch.randint(3, 128, (1, 12)))
    with pytest.raises(KvtoolError, match="unknown heal target"):
        trainable_parameters(m, plan, "everything")


def test_heal_refusals(base, tmp_path):
    m, t = base
    for bad, msg in ((dict(text="web"), "unknown heal text"), (dict(schedule="linear"), "unknown heal schedule"),
                     (dict(tokens=0), "must be"), (dict(data="x.txt"), "--text calibration")):
        with pytest.raises(KvtoolError, match=msg):
            HealSettings(**bad).validated()
    with pytest.raises(KvtoolError, match="nothing to heal"):
        heal(SharingPlan.identity(6), out=tmp_path / "h", model=m, tokenizer=t)


def test_heal_cli_refuses_bad_options_in_one_line(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"kv_source_layers": [0, 0]}))
    runner = CliRunner()
    for bad, msg in ((["--tokens", "lots"], "as a count"), (["--tokens", "0"], "at least 1"),
                     (["--train", "bogus"], "unknown heal target"), (["--text", "web"], "unknown heal text")):
        r = runner.invoke(app, ["heal", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "h"), *bad])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "h").exists()


def test_agreement_counts_positions_and_stops():
    from kvtool.evaluation.generations import agreement

    a = agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]], 4)
    assert a == {"exact_match": 0.5, "mean_common_prefix": 2.0, "token_agreement": (3 / 4 + 4 / 4) / 2}


def test_eval_of_a_healed_export_reports_base_unhealed_and_healed(base, tmp_path):
    from kvtool.evaluation.evaluate import evaluate
    from kvtool.metrics import perplexity

    m, t = base
    plan = SharingPlan([0, 1, 1, 3, 3, 3])
    heal(plan, out=tmp_path / "healed", model=m, tokenizer=t, settings=HealSettings(**{**SET, "tokens": 600}))
    options = {"ppl": {"samples": 2, "seq_len": 32}, "generate": {"new_tokens": 8},
               "passkey": {"lengths": (96,), "depths": (0.5,)}}
    rep = evaluate(tmp_path / "healed", tasks=("ppl", "generate", "passkey"), options=options)
    T = rep["tasks"]
    assert set(T["passkey"]["accuracy"]) == {"base", "unhealed", "shared"}
    assert 0 <= T["generate"]["unhealed"]["token_agreement"] <= 1 and 0 <= T["generate"]["token_agreement"] <= 1
    fresh, _ = kvtool.load(tmp_path / "base")
    from kvtool.data.texts import heldout_chunks

    with kvtool.sharing(fresh, plan):
        want, _ = perplexity(fresh, heldout_chunks(t, 2, 32).input_ids)
    assert T["ppl"]["unhealed"] == pytest.approx(want, rel=1e-4)
    assert T["ppl"]["ratio_unhealed"] == pytest.approx(want / T["ppl"]["base"], rel=1e-4)


def test_the_default_budget_follows_the_device():
    from kvtool.heal import DEFAULT_SAMPLE_BATCH, DEFAULT_TOKENS, for_device

    auto = HealSettings().validated()
    assert auto.tokens is None
    assert for_device(auto, torch.device("cpu")).tokens == DEFAULT_TOKENS["cpu"] == 256_000
    assert for_device(auto, torch.device("meta")).tokens == DEFAULT_TOKENS["cpu"]
    assert for_device(auto, torch.device("cuda", 0)).tokens == DEFAULT_TOKENS["cuda"] > DEFAULT_TOKENS["cpu"]
    assert for_device(HealSettings(tokens=5000), torch.device("cuda")).tokens == 5000
    # the sampling batch (rows per corpus shard) too; a setting of the user's, or of a 0.x recipe (32), stays
    assert for_device(auto, torch.device("cpu")).sample_batch == DEFAULT_SAMPLE_BATCH["cpu"] == 128
    assert for_device(auto, torch.device("cuda")).sample_batch == DEFAULT_SAMPLE_BATCH["cuda"]
    assert for_device(HealSettings(sample_batch=8), torch.device("cuda")).sample_batch == 8
    old = {k: v for k, v in HealSettings().to_dict().items() if k != "sample_batch"}
    assert HealSettings.from_dict(old).sample_batch == 32
    with pytest.raises(KvtoolError, match="sampling batch"):
        HealSettings(sample_batch=0).validated()
