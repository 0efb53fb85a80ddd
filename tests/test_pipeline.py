"""``kvtool.compress`` (calibrate → search → export in one call) and reproducing a run from its recipe."""

from __future__ import annotations

import json

import pytest
import torch
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
    with pytest.raises(KvtoolError, match="target must be float"):
        Recipe.from_dict({"search": {"target": "most"}})
    with pytest.raises(KvtoolError, match="unknown order 'sideways'"):
        kvtool.compress(out=tmp_path / "o", recipe=Recipe.from_dict({"search": {"order": "sideways"}}))
    (tmp_path / "r.json").write_text("{nope")
    with pytest.raises(KvtoolError, match="not valid JSON"):
        kvtool.compress(out=tmp_path / "o", recipe=tmp_path / "r.json")
    with pytest.raises(KvtoolError, match="not both"):
        kvtool.compress(out=tmp_path / "o", recipe=Recipe(), target=0.2)
    assert not (tmp_path / "o").exists()


CALIBRATION = CalibrationSettings(samples=4, seq_len=16, seed=1, batch_size=2)  # every field away from its default
# every search option, each set away from its default (with what it needs to mean something on a 4-layer model)
REPLAYED = {
    "target": dict(target=0.25),
    "layers": dict(layers=2),
    "threshold": dict(threshold=50.0),
    "order": dict(order="random", threshold=-1.0),
    "distance": dict(order="dissimilar", distance="cosine", threshold=-1.0),
    "validate": dict(validate="cosine"),
    "pool": dict(pool=2),
    "seed": dict(order="random", seed=3, threshold=-1.0),
    "layout": dict(layout="tail"),
    "group_size": dict(layout="grouped", group_size=3),
    "merge_budget": dict(merge_budget=0.5),
    "merge_method": dict(merge_budget=0.5, merge_method="h2o"),
    "merge_allocation": dict(merge_budget=0.5, merge_allocation="calibrated"),
    "incremental": dict(incremental=False),
    "batch_size": dict(batch_size=2),
    "screen": dict(screen=0, batch_size=2),
    "precision": dict(precision="bfloat16"),
    "granularity": dict(granularity="tensor", target=0.2),
    "beam_width": dict(beam_width=2),
    "refine": dict(refine=3),
    "holdout": dict(holdout=0.25),
    "context": dict(context=64),
    "allow_partial": dict(allow_partial=True, threshold=0.0),
}


def test_every_search_option_is_replayed():
    from dataclasses import fields

    assert set(REPLAYED) == {f.name for f in fields(SearchSettings)}


@pytest.mark.parametrize("option", sorted(REPLAYED))
def test_search_export_replay_gives_a_byte_identical_plan(option, tmp_path):
    from kvtool.calibration.calibrate import calibrate
    from kvtool.io.export import export
    from kvtool.io.tiny import save_tiny
    from kvtool.search import search

    base = save_tiny(tmp_path / "base", "llama", num_hidden_layers=4, vocab_size=128)
    settings = SearchSettings(**REPLAYED[option])
    st = calibrate(base, settings=CALIBRATION)
    plan = search(st, model=base, settings=settings).plan
    recipe = plan.details["recipe"]
    assert recipe["search"] == settings.to_dict() and recipe["calibration"] == CALIBRATION.to_dict()  # verbatim
    export(plan, out=tmp_path / "a")
    r = CliRunner().invoke(app, ["export", "--recipe", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    a, b = read_sidecar(tmp_path / "a"), read_sidecar(tmp_path / "b")
    assert json.dumps(b["plan"]) == json.dumps(a["plan"]) == json.dumps(plan.to_dict())
    assert json.dumps(b["recipe"]) == json.dumps(a["recipe"]) == json.dumps(recipe)


def test_a_healed_export_replays_with_its_heal(tmp_path, monkeypatch):
    from kvtool.formats.heal_settings import HealSettings
    from kvtool.heal import for_device, heal
    from kvtool.io.tiny import save_tiny
    from kvtool.search import search

    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    base = save_tiny(tmp_path / "base", "llama", num_hidden_layers=4, vocab_size=128)
    plan = search(kvtool.calibrate(base, settings=CALIBRATION), model=base, layers=2).plan
    hs = HealSettings(tokens=400, text="calibration", batch_size=2, seq_len=16, val_rows=2, eval_every=200, top_k=8,
                      train="attention")
    heal(plan, out=tmp_path / "h", model=base, settings=hs)
    side = read_sidecar(tmp_path / "h")
    # the recipe keeps the settings as they ran: the device's defaults resolved (a replay elsewhere samples alike)
    assert Recipe.from_dict(side["recipe"]).heal == for_device(hs, torch.device("cpu"))
    assert "settings" not in side["heal"]
    r = CliRunner().invoke(app, ["export", "--recipe", str(tmp_path / "h"), "--out", str(tmp_path / "h2")])
    assert r.exit_code == 0, r.output
    again = read_sidecar(tmp_path / "h2")
    assert json.dumps(again["plan"]) == json.dumps(side["plan"]) and again["recipe"] == side["recipe"]
    assert again["heal"]["tokens_trained"] == side["heal"]["tokens_trained"]
    assert again["weights_fingerprint"] == side["weights_fingerprint"]  # the same training, step for step
