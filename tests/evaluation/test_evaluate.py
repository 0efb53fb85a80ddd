from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

import kvtool
from kvtool.cli import app
from kvtool.data.passkey import answer_ok, build_cases
from kvtool.errors import KvtoolError
from kvtool.evaluation.evaluate import evaluate, make_tasks
from kvtool.evaluation.task import EvalContext, EvalTask, Row, opt, ratio_spread, shown_ratio
from kvtool.evaluation.tasks import TASKS, default_tasks
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.merging.methods import METHODS

HELD_OUT = {"samples": 2, "seq_len": 32}
PROBE = {"batch": 1, "prompt": 16, "new": 2, "repeats": 1}
FAST = {"ppl": HELD_OUT, "fidelity": HELD_OUT, "generate": {"new_tokens": 6},
        "passkey": {"lengths": (64,), "depths": (0.5,)}, "memory": PROBE, "speed": PROBE}


def test_identity_plan_costs_nothing(tiny_dir, tmp_path):
    SharingPlan.identity(6).save(tmp_path / "id.json")
    rep = evaluate(plan=tmp_path / "id.json", model=str(tiny_dir), options=FAST, json_out=tmp_path / "r.json")
    T = rep["tasks"]
    assert T["ppl"]["ratio"] == pytest.approx(1.0)
    assert T["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert T["fidelity"]["top1_agreement"] == 1.0
    assert T["fidelity"]["hidden_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert T["generate"]["exact_match"] == 1.0
    assert T["memory"]["kv_bytes"]["ratio"] == 1.0
    acc = T["passkey"]["accuracy"]
    assert acc["base"] == acc["shared"]
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["ppl"]["tokens"] == 2 * 31
    assert set(rep["seconds"]) == {"load", *T} and "merge" not in T  # no merge budget: nothing to compare
    assert T["speed"]["decode_tok_s"]["pairs"] == 1


def test_sharing_everything_possible_matches_the_formula(tiny_dir, tmp_path):
    SharingPlan([0] * 6).save(tmp_path / "all.json")  # 5 of 6 layers read layer 0
    rep = evaluate(plan=tmp_path / "all.json", model=str(tiny_dir), options=FAST, tasks=("ppl", "memory"))
    assert rep["tasks"]["memory"]["kv_bytes"]["ratio"] == pytest.approx(1 / 6)
    assert rep["tasks"]["memory"]["kv_bytes_prefill"]["ratio"] == pytest.approx(1 / 6)
    assert rep["tasks"]["ppl"]["ratio"] != pytest.approx(1.0)


def test_eval_of_an_export_records_metrics(tiny_dir, tmp_path):
    m, tok = kvtool.load(tiny_dir)
    export(SharingPlan([0, 1, 1, 3, 3, 5]), model=m, tokenizer=tok, out=tmp_path / "exp")
    rep = evaluate(tmp_path / "exp", options=FAST, tasks=("ppl", "memory"), plots=tmp_path / "plots")
    assert rep["tasks"]["memory"]["kv_bytes"]["ratio"] == pytest.approx(4 / 6)
    side = json.loads((tmp_path / "exp" / "kvtool.json").read_text())
    assert side["metrics"]["kv_bytes_ratio"] == pytest.approx(4 / 6)
    assert (tmp_path / "plots" / "distance_map.png").stat().st_size > 1000
    kvtool.load(tmp_path / "exp")  # still loads after the sidecar update


def test_passkey_cases_and_scoring():
    from kvtool.io.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cases = build_cases(tok, lengths=(256, 512), depths=(0.2, 0.8))
    assert len(cases) == 4 and len({c.key for c in cases}) == 4
    for c in cases:
        assert c.input_ids.shape[1] <= c.length
        assert c.input_ids.shape[1] > c.length * 0.85
        assert c.key in tok.decode(c.input_ids[0]).replace(" ", "")
    assert answer_ok(" 12345.", "12345") and not answer_ok("1234", "12345") and not answer_ok("54321", "12345")


def test_cli_eval_and_frontier(tiny_dir, tmp_path):
    SharingPlan([0, 1, 1, 3, 3, 5]).save(tmp_path / "a.json")
    SharingPlan([0, 0, 0, 0, 0, 0]).save(tmp_path / "b.json")
    runner = CliRunner()
    args = ["--model", str(tiny_dir), "--ppl-samples", "2", "--ppl-seq-len", "32", "--speed-batch", "1",
            "--speed-prompt", "16", "--speed-new", "2", "--repeats", "1", "--passkey-lengths", "64"]
    r = runner.invoke(app, ["eval", "--plan", str(tmp_path / "a.json"), "--tasks", "ppl,fidelity,memory", *args])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "0.6667" in r.output
    r = runner.invoke(app, ["eval", "--plans", str(tmp_path / "a.json"), "--plans", str(tmp_path / "b.json"),
                            "--plots", str(tmp_path / "p"), "--json", str(tmp_path / "f.json"), *args])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [round(x["kv_ratio"], 4) for x in rows] == [round(4 / 6, 4), round(1 / 6, 4)]
    assert (tmp_path / "p" / "frontier.png").exists()
    r = runner.invoke(app, ["eval", "--tasks", "ppl,bogus", "--plan", str(tmp_path / "a.json"), *args])
    assert r.exit_code == 2 and "bogus" in r.output
    r = runner.invoke(app, ["eval", *args])
    assert r.exit_code == 2 and "--plan" in r.output


def test_merge_task_compares_merging_with_eviction(tiny_dir, tmp_path):
    plan = SharingPlan([0, 1, 1, 3, 3, 5], merge={"method": "kvmerger", "budget": 0.5, "protected_layers": []})
    plan.save(tmp_path / "m.json")
    fast = {"merge": {"length": 64, "depths": 1, "ppl_samples": 1}}  # passkey at depth 0.5, ppl of 16 after 48
    rep = evaluate(plan=tmp_path / "m.json", model=str(tiny_dir), options=fast, tasks=("merge",))
    rows = rep["tasks"]["merge"]["rows"]
    assert [(r["variant"], r["method"]) for r in rows] == [
        (v, m) for v in ("base", "shared") for m in ("none", *METHODS)]
    by = {(r["variant"], r["method"]): r for r in rows}
    assert by["base", "none"]["kv_ratio"] == 1.0
    assert by["shared", "none"]["kv_ratio"] == pytest.approx(4 / 6)
    for m in METHODS:  # 64-token prompt, every owner keeps floor(0.5 * T) entries
        assert by["base", m]["kv_ratio"] == pytest.approx(0.5, abs=0.02)
        assert by["shared", m]["kv_ratio"] == pytest.approx(0.5 * 4 / 6, abs=0.02)
        assert 0 <= by["shared", m]["passkey"] <= 1 and by["shared", m]["ppl"] > 1
    # the CLI: a budget outside (0, 1] and one the protected layers make impossible are one-line errors
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--plan", str(tmp_path / "m.json"), "--model", str(tiny_dir), "--tasks", "merge",
                            "--merge-budget", "1.5"])
    assert r.exit_code == 2 and "--merge-budget" in r.output
    SharingPlan([0, 1, 1, 3, 3, 5]).save(tmp_path / "p.json")
    r = runner.invoke(app, ["eval", "--plan", str(tmp_path / "p.json"), "--model", str(tiny_dir), "--tasks", "merge",
                            "--merge-budget", "0.5", "--merge-length", "64"])
    assert r.exit_code == 2 and "cannot be met" in r.output and "Traceback" not in r.output


def test_cli_eval_of_a_per_tensor_plan(tiny_dir, tmp_path):
    # layer 2 reads layer 1's keys, layer 3 layer 0's values, layer 5 both from layer 4: 8 of 12 tensors stored
    plan = SharingPlan.from_tensors([0, 1, 1, 3, 4, 4], [0, 1, 2, 0, 4, 4])
    plan.save(tmp_path / "t.json")
    args = ["--model", str(tiny_dir), "--ppl-samples", "2", "--ppl-seq-len", "32", "--speed-batch", "1",
            "--speed-prompt", "16", "--speed-new", "2", "--repeats", "1", "--passkey-lengths", "64"]
    r = CliRunner().invoke(app, ["eval", "--plan", str(tmp_path / "t.json"), "--tasks", "ppl,fidelity,memory,speed",
                                 "--json", str(tmp_path / "r.json"), *args])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "0.6667" in r.output and rep["tasks"]["memory"]["kv_bytes"]["ratio"] == pytest.approx(8 / 12)


@dataclass
class Toy(EvalTask):
    """A task of the test's own: how many layers own KV, times a factor."""

    name: ClassVar[str] = "toy"
    help: ClassVar[str] = "layers that own KV, times a factor"
    factor: int = opt(1, "the factor", min=1)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        L = ctx.v.base.config.num_hidden_layers
        return {"base": L * self.factor, "shared": len(set(ctx.v.plan.kv_source_layers)) * self.factor}

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        return {"toy_owners": result["shared"]}

    @staticmethod
    def rows(result: dict[str, Any]) -> list[Row]:
        return [("owners × factor", str(result["base"]), str(result["shared"]),
                 f"{result['shared'] / result['base']:.3f}")]

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        from rich.table import Table

        t = Table(title="toy table")
        t.add_column("owners")
        t.add_row(str(result["shared"]))
        return t


def test_a_registered_task_runs_is_summarised_and_tabled(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", Toy)  # one module (here, the class above) and one registry line
    m, tok = kvtool.load(tiny_dir)
    export(SharingPlan([0, 1, 1, 3, 3, 5]), model=m, tokenizer=tok, out=tmp_path / "exp")
    rep = evaluate(tmp_path / "exp", tasks=("toy",), options={"toy": {"factor": "3"}})
    assert rep["tasks"]["toy"] == {"base": 18, "shared": 12} and rep["settings"]["toy"] == {"factor": 3}
    assert set(rep["seconds"]) == {"load", "toy"}
    assert json.loads((tmp_path / "exp" / "kvtool.json").read_text())["metrics"]["toy_owners"] == 12
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "toy,ppl", "--set", "toy.factor=2",
                            "--ppl-samples", "1", "--ppl-seq-len", "16"])
    assert r.exit_code == 0, r.output
    assert "owners × factor" in r.output and "toy table" in r.output and "perplexity" in r.output
    assert "seconds: load" in r.output
    r = runner.invoke(app, ["eval", "--list-options"])
    assert r.exit_code == 0 and "toy.factor" in r.output
    for bad, says in ((["--set", "toy.nope=1"], "no option 'nope'"), (["--set", "toy.factor=x"], "cannot read"),
                      (["--set", "toy.factor=0"], "at least 1"), (["--set", "toy=1"], "TASK.OPTION=VALUE"),
                      (["--set", "nosuch.x=1"], "unknown task"), (["--no-such-flag", "1"], "no option --no-such")):
        r = runner.invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "toy", *bad])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, (bad, r.output)


def test_quick_and_full_settings():
    quick, full = make_tasks(), make_tasks(full=True)
    assert [t.name for t in quick] == [t.name for t in full] == list(default_tasks())
    by_q, by_f = {t.name: t for t in quick}, {t.name: t for t in full}
    assert by_q["passkey"].lengths == (512, 1024) and by_f["passkey"].lengths == (512, 1024, 2048)
    assert not by_q["memory"].fresh and by_f["memory"].fresh and by_f["speed"].repeats > by_q["speed"].repeats
    (p,) = make_tasks(["passkey"], {"passkey": {"lengths": "64"}}, full=True)  # options win over --full
    assert p.lengths == (64,) and p.depths == (0.1, 0.5, 0.9)
    with pytest.raises(KvtoolError, match="unknown task"):
        make_tasks(["ppl", "bogus"])


def test_a_ratio_whose_spread_holds_one_is_within_noise():
    r = ratio_spread([10.0, 10.0, 10.0], [8.9, 11.0, 10.2])
    assert r["within_noise"] and r["ratio"] == pytest.approx(1.02) and r["low"] == pytest.approx(0.89)
    assert shown_ratio(r) == "1.02× (0.89–1.10), within noise"
    r = ratio_spread([10.0, 10.0, 10.0], [12.0, 13.0, 12.5])
    assert not r["within_noise"] and shown_ratio(r) == "1.25× (1.20–1.30)"
    assert "noise unknown" in shown_ratio(ratio_spread([10.0], [8.0]))


@pytest.mark.slow
def test_memory_in_fresh_processes_adds_process_memory(tiny_dir, tmp_path):
    SharingPlan([0, 1, 1, 3, 3, 5]).save(tmp_path / "a.json")
    rep = evaluate(plan=tmp_path / "a.json", model=str(tiny_dir), tasks=("memory",),
                   options={"memory": {**PROBE, "fresh": True}})
    m = rep["tasks"]["memory"]
    assert m["kv_bytes"]["ratio"] == pytest.approx(4 / 6) and m["peak_rss_mib"]["base"] > 0
