"""``kvtool.compress`` (calibrate → search → export in one call) and reproducing a run from its recipe."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kvtool
from kvtool.cli import app
from kvtool.errors import KvtoolError
from kvtool.formats.recipe import CalibrationSettings, Recipe, SearchSettings
from kvtool.formats.sidecar import read_sidecar


def test_compress_writes_an_export_whose_recipe_reproduces_the_plan(tiny_dir, tmp_path):
    plan = kvtool.compress(tiny_dir, out=tmp_path / "a", calibration=CalibrationSettings(samples=4, seq_len=16),
                           search_settings=SearchSettings(layers=2, order="dissimilar", threshold=0.0))
    assert len(plan.consumers) == 2
    side = read_sidecar(tmp_path / "a")
    recipe = Recipe.from_dict(side["recipe"])
    assert recipe.model == str(tiny_dir) and recipe.calibration.samples == 4 and recipe.search.order == "dissimilar"
    assert side["plan"] == plan.to_dict()
    m, _ = kvtool.load(tmp_path / "a")  # loads with sharing on, KV checked
    assert m.config.kv_source_layers == plan.kv_source_layers
    r = CliRunner().invoke(app, ["export", "--recipe", str(tmp_path / "a" / "kvtool.json"), "--out",
                                 str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert read_sidecar(tmp_path / "b")["plan"] == side["plan"]  # byte-for-byte the same map, score and details
    assert json.dumps(read_sidecar(tmp_path / "b")["recipe"]) == json.dumps(side["recipe"])


def test_an_export_of_a_search_plan_records_the_recipe_it_came_from(tiny_dir, tmp_path):
    from kvtool.calibration.calibrate import calibrate
    from kvtool.io.export import export
    from kvtool.search import search

    st = calibrate(tiny_dir, samples=4, seq_len=16, seed=2)
    plan = search(st, model=tiny_dir, target=0.33, order="random", seed=5).plan
    export(plan, out=tmp_path / "e")
    rec = Recipe.from_dict(read_sidecar(tmp_path / "e")["recipe"])
    assert (rec.calibration.seed, rec.calibration.samples, rec.search.order, rec.search.seed) == (2, 4, "random", 5)
    again = kvtool.compress(out=tmp_path / "f", recipe=tmp_path / "e")
    assert again.kv_source_layers == plan.kv_source_layers


def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(KvtoolError, match="unknown key"):
        Recipe.from_dict({"calibration": {"samplez": 3}})
    with pytest.raises(KvtoolError, match="unknown order"):
        Recipe.from_dict({"search": {"order": "sideways"}})
    (tmp_path / "r.json").write_text("{nope")
    with pytest.raises(KvtoolError, match="not valid JSON"):
        kvtool.compress(out=tmp_path / "o", recipe=tmp_path / "r.json")
    with pytest.raises(KvtoolError, match="not both"):
        kvtool.compress(out=tmp_path / "o", recipe=Recipe(), target=0.2)
    assert not (tmp_path / "o").exists()
