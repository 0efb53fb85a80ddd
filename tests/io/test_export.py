from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import kvtool
from kvtool.cli import app
from kvtool.crosslayer.runtime import active_plan
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.tiny import TINY_ARCHS, save_tiny
from tests.helpers import plan_for


def _ids():
    return torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_every_architecture(arch, tmp_path):
    d = save_tiny(tmp_path / "base", arch)
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    with torch.no_grad(), kvtool.sharing(m, plan):
        ref = m(_ids()).logits
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    m2, _ = kvtool.load(tmp_path / "exp")
    with torch.no_grad():
        torch.testing.assert_close(m2(_ids()).logits, ref, atol=1e-5, rtol=0)
    # plain transformers with remote code gets the same shared model
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(m3(_ids()).logits, ref, atol=1e-5, rtol=0)
    # ... and refuses to build an unshared model without it
    with pytest.raises(ValueError, match="custom code|trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=False)
    assert m2.config.kv_sharing_modes.count("reuse") == len(plan.consumers)
    # named per base and never as the base itself, so no engine builds the unshared base from this checkpoint
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["architectures"] == [f"Kvtool{type(m).__name__}"] == [type(m3).__name__]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_kvtool.Kvtool{type(m).__name__}"


def test_checkpoint_drops_exactly_the_consumer_kv(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    base = load_file(str(d / "model.safetensors"))
    exp = load_file(str(tmp_path / "exp" / "model.safetensors"))
    dropped = set(base) - set(exp)
    assert dropped == {f"model.layers.{j}.self_attn.{p}_proj.weight" for j in plan.consumers for p in "kv"}
    saved_bytes = sum(base[k].numel() * base[k].element_size() for k in dropped)
    size = lambda p: p.stat().st_size  # noqa: E731
    assert size(d / "model.safetensors") - size(tmp_path / "exp" / "model.safetensors") >= saved_bytes
    side = json.loads((tmp_path / "exp" / "kvtool.json").read_text())
    assert sorted(side["dropped_tensors"]) == sorted(dropped)
    assert side["plan"]["kv_source_layers"] == plan.kv_source_layers and side["versions"]["transformers"]
    assert "kv_source_layers" not in side and "merge" not in side  # the map is stored once, in the plan


@pytest.fixture
def exported(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    export(plan_for(m), model=m, tokenizer=tok, out=tmp_path / "exp")
    return tmp_path / "exp"


def test_corrupted_sidecar(exported):
    (exported / "kvtool.json").write_text("{broken")
    with pytest.raises(KvtoolError, match="not valid JSON"):
        kvtool.load(exported)


def test_sidecar_plan_that_does_not_fit(exported):
    side = json.loads((exported / "kvtool.json").read_text())
    side["plan"]["kv_source_layers"] = [0, 0, 1, 3, 4, 5]  # a chain: invalid
    (exported / "kvtool.json").write_text(json.dumps(side))
    with pytest.raises(KvtoolError, match="itself a consumer"):
        kvtool.load(exported)


def test_truncated_weights(exported):
    f = exported / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(KvtoolError, match="cannot load the weights"):
        kvtool.load(exported)


def test_missing_tensor(exported):
    f = exported / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(KvtoolError, match="missing"):
        kvtool.load(exported)


def test_modified_weights_fail_the_fingerprint(exported):
    f = exported / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] * 2
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(KvtoolError, match="fingerprint"):
        kvtool.load(exported)


def test_plan_for_another_model(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)
    plan = plan_for(m)
    plan.model_fingerprint = "0123456789abcdef"
    with pytest.raises(KvtoolError, match="another model"):
        export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    d = save_tiny(tmp_path / "base", "llama")
    m, tok = kvtool.load(d)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        export(plan_for(m), model=m, tokenizer=tok, out=tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temp dir left behind


def test_load_with_plan_on_the_fly(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, _ = kvtool.load(d)
    plan = plan_for(m)
    plan.save(tmp_path / "p.json")
    with torch.no_grad(), kvtool.sharing(m, plan):
        ref = m(_ids()).logits
    m2, _ = kvtool.load(d, plan=tmp_path / "p.json")
    with torch.no_grad():
        assert torch.equal(m2(_ids()).logits, ref)


def test_cli_export_and_generate(tmp_path):
    d = save_tiny(tmp_path / "base", "llama")
    m, _ = kvtool.load(d)
    plan_for(m).save(tmp_path / "p.json")
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--plan", str(tmp_path / "p.json"), "--model", str(d), "--out",
                            str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", "--plan", str(tmp_path / "p.json"), "--model", str(d), "--out",
                            str(tmp_path / "exp")])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "exp"), "hello there", "--max-new-tokens", "5", "--raw"])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_smollm2_export_answers(smollm2, tmp_path):
    from kvtool.data.chat import prompt_ids

    model, tok = smollm2
    plan = SharingPlan.from_pairs(30, {2: 1, 4: 3, 5: 3})
    base_sd = {k: v.numel() for k, v in model.state_dict().items()}
    export(plan, model=model, tokenizer=tok, out=tmp_path / "exp")
    m2, tok2 = kvtool.load(tmp_path / "exp")
    assert sum(p.numel() for p in m2.state_dict().values()) == sum(base_sd.values()) - 6 * 576 * 192
    ids = prompt_ids(tok2, "What is the capital of France?")
    out = m2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok2.decode(out[0, ids.shape[1]:])


def _as_version_1(exported) -> dict:
    """The export's sidecar as the previous release wrote it (format 1: the map and merge repeated at the top)."""
    side = json.loads((exported / "kvtool.json").read_text())
    side.update(format_version=1, kv_source_layers=side["plan"]["kv_source_layers"], merge=side["plan"]["merge"])
    (exported / "kvtool.json").write_text(json.dumps(side))
    return side


def test_the_last_releases_exports_load_and_tampered_ones_are_refused(exported):
    plan = json.loads((exported / "kvtool.json").read_text())["plan"]
    side = _as_version_1(exported)
    m, _ = kvtool.load(exported)  # format 1 reads in today's shape, KV checked
    assert active_plan(m).to_dict() == plan
    side["kv_source_layers"] = [0, 1, 1, 3, 3, 5]  # its two copies of the map disagree
    (exported / "kvtool.json").write_text(json.dumps(side))
    with pytest.raises(KvtoolError, match="its map and its plan disagree.*re-export"):
        kvtool.load(exported)
    side.update(format_version=7)
    (exported / "kvtool.json").write_text(json.dumps(side))
    with pytest.raises(KvtoolError, match="format version 7 is not supported.*re-export"):
        kvtool.load(exported)


def test_a_sidecar_map_that_config_json_does_not_carry_is_refused(exported):
    side = json.loads((exported / "kvtool.json").read_text())
    side["plan"]["kv_source_layers"] = [0, 0, 2, 2, 4, 4]  # valid, but not the map the weights were exported with
    (exported / "kvtool.json").write_text(json.dumps(side))
    with pytest.raises(KvtoolError, match="config.json and kvtool.json disagree on kv_source_layers"):
        kvtool.load(exported)
