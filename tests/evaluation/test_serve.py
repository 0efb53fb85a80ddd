"""Throughput at a fixed KV budget (eval task ``serve``) and the static cache under a plan."""

from __future__ import annotations

import pytest
import torch

import kvtool
from kvtool.compat import output_cache
from kvtool.crosslayer.kv_check import entry_bytes, layer_bytes
from kvtool.crosslayer.runtime import apply_sharing
from kvtool.errors import KvtoolError
from kvtool.evaluation.evaluate import evaluate
from kvtool.evaluation.serve import parse_size
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.tiny import TINY_ARCHS, tiny_model
from kvtool.merging.methods import make_method
from tests.helpers import plan_for


def test_parse_size():
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("1.5GB") == 1_500_000_000 and parse_size(7) == 7
    with pytest.raises(KvtoolError, match="as a size"):
        parse_size("lots")


@pytest.mark.slow
def test_serve_fits_the_budget_and_batch_grows_by_the_owners_share(tiny_dir, tmp_path):
    m, tok = kvtool.load(tiny_dir)
    plan = SharingPlan([0, 1, 1, 3, 3, 5], merge=make_method(budget=0.5, protected_layers=[]).to_dict())
    export(plan, model=m, tokenizer=tok, out=tmp_path / "exp")  # 4 of 6 layers own KV
    per_seq = 6 * (48 + 8) * entry_bytes(m)  # base: 6 layers x (48 prompt + 8 new) entries
    budget = 10 * per_seq + 123
    s = {"serve": {"kv_budget": budget, "prompt": 48, "new": 8, "repeats": 1}}
    rep = evaluate(tmp_path / "exp", options=s, tasks=("serve",))
    rows = rep["tasks"]["serve"]["rows"]
    assert rows["base"]["kv_bytes_per_seq"] == per_seq and rows["base"]["max_batch"] == 10
    assert rows["shared"]["kv_bytes_per_seq"] == per_seq * 4 // 6 and rows["shared"]["max_batch"] == 15
    assert rows["shared"]["max_batch_ratio"] == pytest.approx(1.5) == rep["tasks"]["serve"]["max_batch_limit"]
    for row in rows.values():
        assert row["kv_bytes_at_max_batch"] == row["max_batch"] * row["kv_bytes_per_seq"] <= budget
        assert (row["max_batch"] + 1) * row["kv_bytes_per_seq"] > budget
        assert row["gen_tok_s"] > 0 and row["decode_tok_s"] > 0
    # the export's merge setting (half of every owner's prompt) shrinks every sequence further
    assert rows["shared+merge"]["kv_bytes_per_seq"] < rows["shared"]["kv_bytes_per_seq"]
    assert rows["shared+merge"]["max_batch"] > rows["shared"]["max_batch"]
    assert rows["base+merge"]["max_batch"] > rows["base"]["max_batch"]
    with pytest.raises(KvtoolError, match="needs a KV budget"):
        evaluate(tmp_path / "exp", tasks=("serve",))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_static_cache_allocates_nothing_for_consumers(arch):
    m = tiny_model(arch, max_position_embeddings=512)
    plan = plan_for(m)
    apply_sharing(m, plan)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    out = m.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static",
                     return_dict_in_generate=True)
    got = layer_bytes(output_cache(out))
    assert [g == 0 for g in got] == [j in plan.consumers for j in range(len(got))]
    assert all(g > 0 for j, g in enumerate(got) if j not in plan.consumers)
    # merged prompts need a dynamic cache: asking for both is a clear error, not a silent fallback
    kvtool.apply_merge(m, make_method(budget=0.5, protected_layers=[]))
    with pytest.raises(KvtoolError, match="DynamicCache"):
        m.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")


@pytest.mark.slow
def test_cli_prints_the_serve_rows(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from kvtool.cli import app

    m, tok = kvtool.load(tiny_dir)
    export(SharingPlan([0, 1, 1, 3, 3, 5]), model=m, tokenizer=tok, out=tmp_path / "exp")
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "ppl", "--ppl-samples", "1",
                                 "--ppl-seq-len", "16", "--kv-budget", "1MiB", "--serve-prompt", "24",
                                 "--serve-new", "4", "--serve-repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "Serving within 1 MiB of KV cache" in r.output and "shared" in r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "exp"), "--tasks", "serve", "--kv-budget", "lots"])
    assert r.exit_code == 2 and "as a size" in r.output
