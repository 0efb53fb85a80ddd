from __future__ import annotations

import json

from typer.testing import CliRunner

from kvtool.cli import app

runner = CliRunner()


def test_help_lists_commands_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("calibrate", "search", "export", "eval"):
        assert cmd in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "kvtool" in r.output


def test_calibrate_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--samples", "4", "--seq-len", "16",
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert meta["samples"] == 4 and meta["seq_len"] == 16 and meta["num_layers"] == 6
    # existing directory: refused, one line, exit 2, files kept
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--samples", "4", "--seq-len", "16",
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--force" in r.output and "Traceback" not in r.output
    assert (tmp_path / "c" / "stats.safetensors").exists()


def test_bad_input_gives_one_line_and_exit_2(tiny_dir, tmp_path):
    r = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output and "Traceback" not in r.output
    (tmp_path / "empty.txt").write_text("")
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_dir), "--data", str(tmp_path / "empty.txt"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no text" in r.output
    assert not (tmp_path / "o").exists()
    (tmp_path / "plan.json").write_text(json.dumps({"kv_source_layers": [0, 0]}))
    for bad in (["--train", "bogus"], ["--tokens", "-1"]):
        r = runner.invoke(app, ["heal", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "h"), *bad])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert not (tmp_path / "h").exists()
    assert "unknown heal target" in runner.invoke(
        app, ["heal", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "h"), "--train", "x"]).output
