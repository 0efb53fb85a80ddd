from __future__ import annotations

import json

import pytest

from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.search.layouts import layout_plan


def test_roundtrip_and_views(tmp_path):
    p = SharingPlan.from_pairs(6, {3: 1, 5: 3}, method="test", target=0.33, score=0.9)
    assert p.kv_source_layers == [0, 1, 2, 1, 4, 1]  # chain 5→3→1 resolved
    assert p.consumers == [3, 5] and p.sources == [1] and p.removed_share() == pytest.approx(2 / 6)
    p.save(tmp_path / "p.json")
    q = SharingPlan.load(tmp_path / "p.json")
    assert q == p
    with pytest.raises(KvtoolError, match="--force"):
        p.save(tmp_path / "p.json")
    p.save(tmp_path / "p.json", force=True)


@pytest.mark.parametrize("src, types, msg", [
    ([0, 0, 1], None, None),
    ([1, 1, 2], None, "layer 0 cannot be a consumer"),
    ([0, 2, 2], None, "not an earlier layer"),
    ([0, 0, 1], None, None),
    ([0, 0, 1, 1], None, None),
    ([0, 0, 1, 2], None, None),
    ([0, 1, 1, 2], None, "itself a consumer"),
    ([0, 1, 0], ["full_attention", "sliding_attention", "sliding_attention"], "same attention type"),
])
def test_validation_faults(src, types, msg):
    p = SharingPlan(src)
    if msg is None:
        if any(src[s] != s for s in src):
            with pytest.raises(KvtoolError):
                p.validate()
        else:
            p.validate()
    else:
        with pytest.raises(KvtoolError, match=msg):
            p.validate(layer_types=types)


def test_wrong_length_unknown_key_version(tmp_path):
    with pytest.raises(KvtoolError, match="3 layers but the model has 4"):
        SharingPlan([0, 0, 2]).validate(num_layers=4)
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"kv_source_layers": [0, 0], "colour": "red"}))
    with pytest.raises(KvtoolError, match="unknown key"):
        SharingPlan.load(f)
    f.write_text(json.dumps({"kv_source_layers": [0, 0], "version": 99}))
    with pytest.raises(KvtoolError, match="version 99"):
        SharingPlan.load(f)
    f.write_text("{not json")
    with pytest.raises(KvtoolError, match="not valid JSON"):
        SharingPlan.load(f)
    with pytest.raises(KvtoolError, match="not found"):
        SharingPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["adjacent", "tail", "grouped"])
@pytest.mark.parametrize("n", [3, 9])
def test_layouts_are_single_pass_and_exact(name, n):
    types = ["full_attention"] * 30
    p = layout_plan(name, types, n)
    assert len(p.consumers) == n
    p.validate(30, types)


def test_layout_shapes():
    full = ["full_attention"] * 12
    assert layout_plan("tail", full, 4).kv_source_layers[8:] == [7, 7, 7, 7]
    adj = layout_plan("adjacent", full, 3).kv_source_layers
    assert all(adj[j] == j - 1 for j in range(12) if adj[j] != j)
    grp = layout_plan("grouped", full, 6, group_size=4)
    firsts = sorted(set(grp.sources))
    assert len(firsts) == 2 and all(grp.kv_source_layers[f + k] == f for f in firsts for k in (1, 2, 3))


def test_layouts_respect_mixed_attention_types():
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(26)]
    for name in ("adjacent", "tail", "grouped"):
        layout_plan(name, types, 6).validate(26, types)
