"""What the OS and the parsers throw becomes one ``error:`` line, exit 2, naming the path, with nothing left behind:
a full disk while exporting or calibrating (a patched writer), and JSON too deep to parse in every reader."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvtool.cli import app
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.sidecar import SIDECAR


def _deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


def _one_line(r, *words):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.count("error:") == 1
    for w in words:
        assert w in r.output


def test_deep_json_in_every_reader_is_one_line(tiny_dir, tmp_path):
    runner = CliRunner()
    (tmp_path / "plan.json").write_text(_deep())
    _one_line(runner.invoke(app, ["export", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o")]),
              "plan.json", "nested too deeply")
    side = tmp_path / "exp"
    side.mkdir()
    (side / "config.json").write_text("{}")
    (side / SIDECAR).write_text(json.dumps({"format": "kvtool-export"})[:-1] + ', "x": ' + _deep() + "}")
    _one_line(runner.invoke(app, ["generate", str(side), "hi"]), SIDECAR, "nested too deeply")
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "calibration.json").write_text(_deep())
    (cal / "stats.safetensors").write_bytes(b"")
    _one_line(runner.invoke(app, ["search", "--stats", str(cal), "--out", str(tmp_path / "p.json")]), "cal")
    (tmp_path / "recipe.json").write_text(_deep())
    _one_line(runner.invoke(app, ["export", "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "o")]),
              "recipe.json", "nested too deeply")
    assert not (tmp_path / "o").exists()
    with pytest.raises(KvtoolError, match="nested too deeply"):
        SharingPlan.load(tmp_path / "plan.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(KvtoolError, match="dir.json"):
        SharingPlan.load(tmp_path / "dir.json")


@pytest.mark.parametrize("step", ["export", "calibrate"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, step):
    import safetensors.torch
    import transformers

    from kvtool.formats import stats

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    class SafetensorError(Exception):  # what safetensors raises when its write fails
        pass

    def full_st(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    runner = CliRunner()
    if step == "export":
        SharingPlan([0, 1, 1, 3, 3, 5]).save(tmp_path / "plan.json")
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_st)
        r = runner.invoke(app, ["export", "--plan", str(tmp_path / "plan.json"), "--model", str(tiny_dir), "--out",
                                str(tmp_path / "out")])
    else:
        monkeypatch.setattr(stats, "save_file", full)
        r = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--samples", "2", "--seq-len", "16", "--out",
                                str(tmp_path / "out")])
    _one_line(r, "cannot write", str(tmp_path / "out"), "No space left on device")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert safetensors.torch.save_file is not None
