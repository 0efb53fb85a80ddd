"""``kvtool eval --lm-eval``: lm-evaluation-harness's own evaluator on the base and the shared model, offline, on the
tasks kvtool ships (and on any harness task whose data is cached)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from typer.testing import CliRunner

import kvtool
import kvtool.crosslayer.attention as sa
import kvtool.evaluation.lm_eval as le
from kvtool.cli import app
from kvtool.data.passkey import build_cases
from kvtool.errors import KvtoolError
from kvtool.evaluation.lm_eval import run_lm_eval
from kvtool.evaluation.lm_eval_tasks import TASKS, next_sentence_docs, passkey_docs, write_tasks
from kvtool.evaluation.variants import Variants
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.tiny import save_tiny
from tests.helpers import plan_for

pytestmark = pytest.mark.slow  # the harness starts processes (git, pip) to describe its environment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("lm_eval") / "llama", "llama")
    model, tok = kvtool.load(d)
    return d, model, tok


def _metrics(rep: dict, task: str) -> dict:
    return rep["tasks"][task]["metrics"]


def test_identity_plan_scores_like_the_base(tiny):
    _, model, tok = tiny
    v = Variants(model, tok, SharingPlan.identity(model.config.num_hidden_layers))
    rep = run_lm_eval(v, list(TASKS), limit=3)
    assert rep["limit"] == 3 and rep["lm_eval_version"]
    assert set(rep["tasks"]) == set(TASKS)
    for task in TASKS:
        assert 1 <= rep["tasks"][task]["samples"] <= 3
        for name, m in _metrics(rep, task).items():
            assert m["base"] is not None and m["shared"] == pytest.approx(m["base"], rel=1e-4), (task, name)
    ppl = _metrics(rep, "kvtool_pydoc_ppl")
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(ppl[k]["base"]) and ppl[k]["base"] > 1 for k in ("word_perplexity", "byte_perplexity"))
    assert 0 <= _metrics(rep, "kvtool_passkey")["exact_match"]["base"] <= 1
    assert {"acc", "acc_norm"} <= set(_metrics(rep, "kvtool_pydoc_next"))


def test_a_shared_plan_is_in_effect_in_every_harness_forward(tiny, monkeypatch):
    _, model, tok = tiny
    plan = plan_for(model)
    checked = {"base": 0, "shared": 0}
    real = le.check_layer_bytes

    def counting(m, got, prompt, new=0, batch=1):
        real(m, got, prompt, new, batch)  # raises unless the cache holds what the active map implies
        empty = [i for i, g in enumerate(got) if g == 0]
        checked["shared" if empty == plan.consumers else "base" if not empty else "other"] += 1

    monkeypatch.setattr(le, "check_layer_bytes", counting)
    rep = run_lm_eval(Variants(model, tok, plan), ["kvtool_pydoc_ppl", "kvtool_passkey"], limit=2)
    assert checked["base"] > 0 and checked["shared"] > 0 and set(checked) == {"base", "shared"}
    ppl = _metrics(rep, "kvtool_pydoc_ppl")["byte_perplexity"]
    assert ppl["shared"] != ppl["base"] and math.isfinite(ppl["shared"]) and ppl["shared"] > 1
    assert 0 <= _metrics(rep, "kvtool_passkey")["exact_match"]["shared"] <= 1


def _drop_cache(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kw):
    """The transformers 5.24 bug, re-enacted: a forward that never sees the cache."""
    return _ORIGINAL(self, hidden_states, position_embeddings, attention_mask, None, None, **kw)


_ORIGINAL = sa.attention_forward


def test_a_runtime_that_stops_sharing_inside_the_harness_fails(tiny, monkeypatch):
    _, model, tok = tiny
    monkeypatch.setattr(sa, "attention_forward", _drop_cache)
    with pytest.raises(KvtoolError, match="sharing is not in effect"):
        run_lm_eval(Variants(model, tok, plan_for(model)), ["kvtool_passkey"], limit=1)
    # a shared model that runs another map than the one evaluated is refused before the harness starts
    with pytest.raises(KvtoolError, match="the shared model runs the map"):
        run_lm_eval(Variants(model, tok, plan_for(model), shared_model=model), ["kvtool_passkey"], limit=1)


def test_shipped_task_data(tiny, tmp_path):
    _, _, tok = tiny
    out = write_tasks(tmp_path, tok, passkey_lengths=(512, 1024), passkey_depths=(0.1, 0.9), max_length=256)
    for name in TASKS:
        assert (out / f"{name}.yaml").read_text().count(tmp_path.as_posix()) == 2  # data file and cache dir
        assert "@DATA_DIR@" not in (out / f"{name}.yaml").read_text()
    rows = [json.loads(x) for x in (out / "kvtool_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["key"]) == 5 and r["length"] == 240 for r in rows)  # fitted to the model
    # the prompt text tokenizes back to kvtool's own passkey prompt
    case = build_cases(tok, (240,), (0.1,))[0]
    assert tok(passkey_docs(tok, (240,), (0.1,))[0]["prompt"])["input_ids"] == case.input_ids[0].tolist()
    nxt = next_sentence_docs(["One sentence here is long enough. The next one follows it closely.",
                              "Another topic entirely has this sentence. And this is its second sentence."] * 2,
                             items=2, choices=2)
    assert len(nxt) == 2 and all(len(r["choices"]) == 2 and 0 <= r["label"] < 2 for r in nxt)


def test_errors_are_one_line(tiny, monkeypatch):
    _, model, tok = tiny
    v = Variants(model, tok, plan_for(model))
    with pytest.raises(KvtoolError, match='knows no task "kvtool_nope"'):
        run_lm_eval(v, ["kvtool_nope"], limit=1)
    with pytest.raises(KvtoolError, match="limit must be at least 1"):
        run_lm_eval(v, ["kvtool_passkey"], limit=0)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(KvtoolError, match=r"pip install 'kvtool\[eval\]'"):
        run_lm_eval(v, ["kvtool_passkey"])
    with pytest.raises(KvtoolError, match=r"pip install 'kvtool\[eval\]'"):
        le.require_lm_eval()


def test_a_harness_task_without_cached_data_is_a_clear_error(tiny):
    _, model, tok = tiny
    with pytest.raises(KvtoolError, match=r'could not load the data of "lambada_openai" offline') as e:
        run_lm_eval(Variants(model, tok, plan_for(model)), ["lambada_openai"], limit=1)
    assert "\n" not in str(e.value)


def _cache_as_hub_dataset(tmp_path, repo: str, config: str, rows: list[dict]):
    """Put ``rows`` into a datasets cache laid out as if ``repo`` had been downloaded from the Hub (test split)."""
    import datasets

    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.load_dataset("json", data_files={"test": str(src)}, cache_dir=str(tmp_path / "build"))
    built = next((tmp_path / "build" / "json").glob("*/*/*"))
    name = repo.split("/")[-1]
    dst = tmp_path / "hub" / repo.replace("/", "___") / config / built.parts[-2] / built.parts[-1]
    dst.mkdir(parents=True)
    (dst / f"{name}-test.arrow").write_bytes((built / "json-test.arrow").read_bytes())
    info = json.loads((built / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": config, "dataset_name": name,
                                                       "builder_name": name}))
    return tmp_path / "hub"


def test_a_harness_task_with_cached_data_runs_offline(tiny, tmp_path, monkeypatch):
    import datasets.config

    _, model, tok = tiny
    rows = [{"text": f"The lamp on the desk was switched off after supper on day {i} and the room went dark"}
            for i in range(4)]
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        _cache_as_hub_dataset(tmp_path, "EleutherAI/lambada_openai", "default", rows))
    rep = run_lm_eval(Variants(model, tok, plan_for(model)), ["lambada_openai"], limit=3)
    m = _metrics(rep, "lambada_openai")
    assert rep["tasks"]["lambada_openai"]["samples"] == 3 and set(m) == {"perplexity", "acc"}
    assert m["perplexity"]["base"] > 1 and m["perplexity"]["shared"] != m["perplexity"]["base"]


def test_cli_eval_prints_the_harness_rows(tiny, tmp_path):
    model, tok = kvtool.load(tiny[0])  # exporting shares the model it is given in place
    export(plan_for(model), model=model, tokenizer=tok, out=tmp_path / "exp")
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "ppl", "--lm-eval", "kvtool_pydoc_ppl",
                                 "--lm-eval-limit", "2", "--ppl-samples", "2", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "lm-evaluation-harness" in r.output and "kvtool_pydoc_ppl" in r.output and "byte_perplexity" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())["tasks"]["lm_eval"]
    assert rep["limit"] == 2 and rep["tasks"]["kvtool_pydoc_ppl"]["samples"] == 2
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "ppl", "--lm-eval", "kvtool_nope"])
    assert r.exit_code == 2 and "kvtool_nope" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_smollm2_harness_matches_kvtools_own_passkey(smollm2):
    from kvtool.evaluation.passkey import passkey

    model, tok = kvtool.load()  # a fresh copy (cached by the fixture): exporting shares the session's in place
    v = Variants(model, tok, SharingPlan.from_pairs(30, {2: 1, 4: 3, 5: 3}))
    rep = run_lm_eval(v, list(TASKS), limit=2, passkey_lengths=(512,), passkey_depths=(0.1, 0.5))
    ppl = _metrics(rep, "kvtool_pydoc_ppl")["byte_perplexity"]
    assert 1 < ppl["base"] < ppl["shared"] < 4
    own = passkey(v, (512,), (0.1, 0.5))["accuracy"]  # the same prompts, through kvtool's own generate loop
    key = _metrics(rep, "kvtool_passkey")["exact_match"]
    assert key["base"] == own["base"]["512"] == 1.0 and key["shared"] == own["shared"]["512"]
    assert all(0 <= m["shared"] <= 1 for m in _metrics(rep, "kvtool_pydoc_next").values())
