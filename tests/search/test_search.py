from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvtool.calibration.calibrate import calibrate
from kvtool.cli import app
from kvtool.crosslayer.runtime import sharing
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.io.tiny import tiny_model, tiny_tokenizer
from kvtool.search import search
from kvtool.search.orders import rank_pairs, with_pair
from kvtool.search.scoring import Scorer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_stats(tok):
    m = tiny_model("llama", num_hidden_layers=8)
    return m, calibrate(m, tokenizer=tok, samples=6, seq_len=24, batch_size=4)


def test_rank_orders():
    d = torch.tensor([[0, 5, 1], [5, 0, 3], [1, 3, 0]], dtype=torch.float)
    full = ["full_attention"] * 3
    assert rank_pairs(d, full, "dissimilar") == [(0, 1), (1, 2), (0, 2)]
    assert rank_pairs(d, full, "similar") == [(0, 2), (1, 2), (0, 1)]
    assert sorted(rank_pairs(d, full, "random", seed=1)) == [(0, 1), (0, 2), (1, 2)]
    mixed = ["full_attention", "sliding_attention", "full_attention"]
    assert rank_pairs(d, mixed, "dissimilar") == [(0, 2)]


def test_chain_resolution():
    def pair(src, i, j):
        return list(with_pair((tuple(src), tuple(src)), i, j)[0])

    assert pair([0, 1, 2, 3], 1, 3) == [0, 1, 2, 1]
    assert pair([0, 0, 2, 3], 1, 3) == [0, 0, 2, 0]  # i is a consumer: j reads i's source
    assert pair([0, 1, 2, 1], 0, 1) == [0, 0, 2, 0]  # j had readers: they follow j to its new source


def test_incremental_scores_equal_full_scores(llama_stats):
    m, st = llama_stats
    kw = dict(metric="cosine", batch_size=4)
    inc = Scorer(m, st.input_ids, st.final_hidden, incremental=True, **kw)
    full = Scorer(m, st.input_ids, st.final_hidden, incremental=False, **kw)
    base = SharingPlan.identity(8)
    s_inc = inc.initial(base)
    s_full = full.initial(base)
    assert s_inc.value == pytest.approx(1.0, abs=1e-5)
    p1 = SharingPlan([0, 1, 2, 3, 4, 2, 6, 7])
    a, b = inc.score(s_inc, p1, start=5), full.score(s_full, p1)
    assert a.value() == pytest.approx(b.value(), abs=1e-5)
    s_inc, s_full = inc.advance(s_inc, a), full.advance(s_full, b)
    p2 = SharingPlan([0, 1, 2, 1, 4, 2, 6, 1])
    assert inc.score(s_inc, p2).value() == pytest.approx(full.score(s_full, p2).value(), abs=1e-5)
    assert inc.layer_forwards < full.layer_forwards
    # the score is the real output cosine of the shared model
    with torch.no_grad(), sharing(m, p2):
        h = m.model(input_ids=st.input_ids).last_hidden_state
    expect = torch.nn.functional.cosine_similarity(h.flatten(1), st.final_hidden.flatten(1)).mean()
    assert inc.score(s_inc, p2).value() == pytest.approx(float(expect), abs=1e-5)
    # scoring on some batches, then completing, gives the same score and state as scoring on all at once
    part = inc.score(s_inc, p2, batches=[0])
    assert sorted(part.vals) == [0]
    whole = inc.complete(s_inc, part)
    assert whole.value() == pytest.approx(inc.score(s_inc, p2).value(), abs=1e-6)
    assert inc.advance(s_inc, whole).value == pytest.approx(whole.value())
    with pytest.raises(RuntimeError, match="every batch"):
        inc.advance(s_inc, inc.score(s_inc, p2, batches=[1]))


def test_kl_metric_is_zero_for_identity(llama_stats):
    m, st = llama_stats
    s = Scorer(m, st.input_ids, st.final_hidden, metric="kl", batch_size=4)
    state = s.initial(SharingPlan.identity(8))
    assert state.value == pytest.approx(0.0, abs=1e-6)
    plan = SharingPlan([0, 0, 2, 3, 4, 5, 6, 7])
    value = s.score(state, plan).value()
    # the same KL computed directly from full forwards at the scorer's positions
    from kvtool.metrics import kl_per_sample, logits_from_hidden

    with torch.no_grad():
        base = torch.log_softmax(logits_from_hidden(m, st.final_hidden[:, s.kl_pos]), -1)
        with sharing(m, plan):
            h = m.model(input_ids=st.input_ids).last_hidden_state[:, s.kl_pos]
        expect = kl_per_sample(base, logits_from_hidden(m, h)).mean()
    assert value > 0 and value == pytest.approx(float(expect), rel=1e-4)


def test_greedy_walks_in_order_and_stops_at_target(llama_stats):
    m, st = llama_stats
    # everything passes: the first admissible pairs win
    r = search(st, model=m, layers=3, threshold=-1.0, order="dissimilar")
    pairs = rank_pairs(st.distance("euclidean"), ["full_attention"] * 8, "dissimilar")
    assert len(r.plan.consumers) == 3 and not r.exhausted
    assert [(t.i, t.j) for t in r.tries][0] == pairs[0]
    assert all(t.accepted for t in r.tries)
    r.plan.validate(8)


def test_threshold_rejects_and_exhaustion(llama_stats):
    m, st = llama_stats
    with pytest.raises(KvtoolError, match="guard .cosine >= 1.01. stopped the search at 0.0% .* short of 2 layers"):
        search(st, model=m, layers=2, threshold=1.01, order="dissimilar")  # none can pass
    warned = []
    r = search(st, model=m, layers=2, threshold=1.01, order="dissimilar", warn=warned.append, allow_partial=True)
    assert r.exhausted and r.partial and r.plan.consumers == [] and warned


def test_incremental_and_full_search_agree_on_gemma3(tok):
    m = tiny_model("gemma3_text")
    st = calibrate(m, tokenizer=tok, samples=4, seq_len=20, batch_size=4)
    a = search(st, model=m, layers=2, threshold=0.0, order="dissimilar", incremental=True)
    b = search(st, model=m, layers=2, threshold=0.0, order="dissimilar", incremental=False)
    assert a.plan.kv_source_layers == b.plan.kv_source_layers
    assert [t.score for t in a.tries] == pytest.approx([t.score for t in b.tries], abs=1e-5)
    a.plan.validate(6, st.meta["layer_types"])


def test_deterministic_bytes_and_fingerprint_check(llama_stats, tmp_path):
    m, st = llama_stats
    search(st, model=m, layers=2, order="random", seed=3, out=tmp_path / "a.json")
    search(st, model=m, layers=2, order="random", seed=3, out=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = tiny_model("llama", num_hidden_layers=8, seed=1)
    with pytest.raises(KvtoolError, match="fingerprint"):
        search(st, model=other, layers=2, order="dissimilar")


def test_cli_search_and_compare(tiny_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--samples", "4", "--seq-len", "16",
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--stats", str(tmp_path / "c"), "--target", "0.33", "--out",
                            str(tmp_path / "plan.json"), "--order", "dissimilar", "--min-cosine", "0.0",
                            "--merge-budget", "0.8"])  # 3 of the 4 owners are protected: 0.5 cannot be met
    assert r.exit_code == 0, r.output
    plan = SharingPlan.load(tmp_path / "plan.json")
    assert len(plan.consumers) == 2 and plan.merge["budget"] == 0.8
    r = runner.invoke(app, ["search", "--stats", str(tmp_path / "c"), "--layout", "tail", "--layers", "2", "--out",
                            str(tmp_path / "tail.json")])
    assert r.exit_code == 0 and SharingPlan.load(tmp_path / "tail.json").kv_source_layers == [0, 1, 2, 3, 3, 3]
    r = runner.invoke(app, ["search", "--stats", str(tmp_path / "c"), "--target", "0.33", "--compare",
                            "--json", str(tmp_path / "cmp.json")])
    assert r.exit_code == 0, r.output
    assert "order=dissimilar" in r.output and "layout=tail" in r.output
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert rows[0]["calib_cosine"] == pytest.approx(1.0, abs=1e-4) and rows[0]["calib_kl"] == pytest.approx(0, abs=1e-5)
    r = runner.invoke(app, ["search", "--stats", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not a calibration directory" in r.output


def test_a_new_order_is_one_class_and_one_registry_line(llama_stats, monkeypatch):
    """What docs/ARCHITECTURE.md promises: a strategy class plus one line in ``ORDERS``, and ``--order`` runs it."""
    from dataclasses import dataclass

    from kvtool.search import strategies
    from kvtool.search.moves import identity
    from kvtool.search.orders import with_pair
    from kvtool.search.strategy import Context, Outcome, Try

    @dataclass
    class Deepest:  # the deepest layers read their neighbour below, until the byte goal is met
        default_metric = "kl"
        guarded = False

        @classmethod
        def from_settings(cls, s):
            return cls()

        def label(self) -> str:
            return "deepest"

        def run(self, ctx: Context) -> Outcome:
            src, tries, scorer = identity(len(ctx.types)), [], ctx.scorer()
            for j in range(len(ctx.types) - 1, 1, -2):
                if ctx.goal.reached(src):
                    break
                src = with_pair(src, j - 1, j)
                tries.append(ctx.tried(Try(len(tries), j, j - 1, "kv", f"{j}←{j - 1}", 0.0, True, len(tries) + 1,
                                           ctx.removed(src), ctx.needed)))
            return Outcome(src, round(scorer.initial(SharingPlan.from_tensors(*map(list, src))).value, 6), tries)

    monkeypatch.setitem(strategies.ORDERS, "deepest", Deepest)
    m, st = llama_stats
    seen = []
    r = search(st, model=m, target=0.25, order="deepest", on_try=seen.append)
    L = st.num_layers
    assert r.plan.method == "deepest" and r.plan.consumers == [L - 3, L - 1]
    assert r.plan.details["measured"]["kv_bytes_removed"] >= 0.25 and seen == r.tries and r.plan.score >= 0
    assert r.plan.details["recipe"]["search"]["order"] == "deepest"


def test_layouts_meet_the_byte_target_with_the_fewest_layers(tmp_path):
    """``--target`` is a share of KV bytes for layouts too: a sliding-window model's sliding layers hold few
    bytes, so a layout takes as many layers as the bytes need, and the plan says what it removed."""
    from kvtool.calibration.calibrate import calibrate
    from kvtool.io.tiny import tiny_model, tiny_tokenizer

    m = tiny_model("gemma3_text", num_hidden_layers=12)
    st = calibrate(m, tokenizer=tiny_tokenizer(), samples=2, seq_len=16)
    for target in (0.1, 0.3, 0.5):  # at 0.5, round(0.5 · 12) = 6 layers would remove 49.8%
        plan = search(st, layout="tail", target=target).plan  # no model needed: the calibration has the window
        removed = plan.details["measured"]["kv_bytes_removed"]
        assert removed >= target and removed == round(plan.removed_share(m.config.sliding_window), 6)
        fewer = search(st, layout="tail", layers=len(plan.consumers) - 1).plan
        assert fewer.removed_share(m.config.sliding_window) < target  # the fewest layers that meet it


def test_screened_tries_say_so_and_the_kept_one_has_its_full_score(llama_stats):
    """With ``screen=1`` the candidates of a step are compared on one scoring batch; the kept one is then scored on
    all of them. The log must not set the passed-over candidates' one-batch scores beside the kept one's full score
    as if they compared: each try says whether its score is a screening score."""
    m, st = llama_stats  # 6 chunks in batches of 2: three scoring batches
    screened = search(st, model=m, layers=2, order="best-first", pool=3, screen=1, batch_size=2)
    full = search(st, model=m, layers=2, order="best-first", pool=3, screen=0, batch_size=2)
    kept = [t for t in screened.tries if t.accepted]
    assert kept and not any(t.screened for t in kept)
    passed = [t for t in screened.tries if not t.accepted]
    assert passed and all(t.screened for t in passed)  # none refused by a guard: none is set
    assert not any(t.screened for t in full.tries)
    # a kept try's score is its full score: the unscreened search scored the same step-0 candidates in full
    full_scores = {t.move: t.score for t in full.tries if t.step == 0}
    first = next(t for t in kept if t.step == 0)
    assert first.score == pytest.approx(full_scores[first.move], abs=1e-5)
