"""Issue 8: local damage scores, best-first search, KL validation, heal."""

from __future__ import annotations

import pytest
import torch

import kvtool
from kvtool.calibration.calibrate import calibrate
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.io.tiny import tiny_model, tiny_tokenizer
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
    assert loc.plan.details["measured"]["validate"] == "kl" and len(loc.plan.consumers) == 3
    bf = search(st, model=m, layers=3, order="best-first", pool=3, threshold=10.0)
    assert len(bf.plan.consumers) == 3 and bf.plan.details["recipe"]["search"]["pool"] == 3
    steps = {}
    for t in bf.tries:
        steps.setdefault(t.step, []).append(t)
    assert len(steps) == 3 and all(len(v) <= 3 for v in steps.values())
    for v in steps.values():  # the accepted candidate of each step has the lowest KL of that step
        kept = [t for t in v if t.accepted]
        assert len(kept) == 1 and kept[0].score == min(t.score for t in v)
    with pytest.raises(KvtoolError, match="guard"):
        search(st, model=m, layers=3, order="best-first", pool=3, threshold=0.0)
    strict = search(st, model=m, layers=3, order="best-first", pool=3, threshold=0.0, allow_partial=True)
    assert strict.exhausted and strict.plan.consumers == []


