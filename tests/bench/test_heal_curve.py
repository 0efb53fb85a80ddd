"""bench/heal_curve.py --redraw: runs saved as JSON are drawn side by side, labelled by name and token budget."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def hc(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("heal_curve")


def _run(path: Path, budget: int, ppl: list[float]) -> Path:
    curve = [{"tokens": t, "ppl": p, "token_agreement": 0.3}
             for t, p in zip((0, budget // 4, budget), ppl, strict=True)]
    path.write_text(json.dumps({"name": "lora, lr 0.002, constant", "settings": {"tokens": budget},
                                "base_ppl": 16.0, "curve": curve}))
    return path


def test_redraw_draws_saved_runs_without_training(hc, tmp_path, monkeypatch, capsys):
    a = _run(tmp_path / "a.json", 1_000_000, [28.0, 20.0, 19.0])
    b = _run(tmp_path / "b.json", 249_856, [28.0, 21.0, 19.5])  # the same name, another budget: its own line
    png = tmp_path / "curve.png"
    monkeypatch.setattr(sys, "argv", ["heal_curve.py", "--redraw", "--json", str(a), "--also", str(b),
                                      "--plot", str(png)])
    hc.main()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    drawn = {}
    monkeypatch.setattr("kvtool.plots.heal_curve", lambda curves, base: drawn.update(curves) or b"png")
    hc.main()
    assert sorted(drawn) == ["lora, lr 0.002, constant, 1,000,000 tokens", "lora, lr 0.002, constant, 249,856 tokens"]
    monkeypatch.setattr(sys, "argv", ["heal_curve.py", "--redraw", "--json", str(a)])
    with pytest.raises(SystemExit) as e:
        hc.main()
    assert e.value.code == 2 and "--redraw draws --plot" in capsys.readouterr().err
