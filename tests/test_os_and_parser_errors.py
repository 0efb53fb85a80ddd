"""What the OS and the parsers throw becomes one ``error:`` line, exit 2, naming the path, with nothing left behind.

Outputs (calibrate's directory, search's plan, export, heal, compress, eval's --json, the sidecar update after eval,
plots, the $KVTOOL_CACHE corpus and GGUF conversion): a file above the output, no permission, a read-only file system
and the wrong kind are refused before any work; a full or read-only file system (a real tmpfs where this runs as
root, else skipped: the patched-writer test stands in) fails the write without leaving a temporary or damaging an
older output. Inputs: unreadable, too deep, too long a number, too large, wrong types (see also
formats/test_properties.py). All through the CLI in-process, on tiny random models.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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
    assert "Traceback" not in r.output
    assert [line for line in r.output.splitlines() if "error:" in line] == [
        next(line for line in r.output.splitlines() if line.startswith("error:"))], r.output
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


# --- every output the OS refuses: a file above it, no permission, a read-only or full file system, the wrong kind ---

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, read_only=False)``: a small tmpfs of its own under tmp_path (root only: skipped elsewhere);
    ``fill(d)`` leaves it no free block, ``remount_ro(d)`` makes it read-only."""
    mounted: list[Path] = []

    def mount(name: str, read_only: bool = False, size: str = "4m") -> Path:
        d = tmp_path / name
        d.mkdir()
        if _libc.mount(b"tmpfs", os.fsencode(d), b"tmpfs", MS_RDONLY if read_only else 0,
                       f"size={size}".encode()) != 0:
            pytest.skip(f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}); the patched-writer test "
                        "covers a full disk")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        _libc.umount2(os.fsencode(d), MNT_DETACH)


def _fill(d: Path, leave: int = 0) -> None:
    """Take every free block of d's file system but ``leave`` bytes (whole pages)."""
    with contextlib.suppress(OSError), open(d / ".fill", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    if leave:
        os.truncate(d / ".fill", max(0, (d / ".fill").stat().st_size - leave))


def _remount_ro(d: Path) -> None:
    assert _libc.mount(None, os.fsencode(d), None, MS_REMOUNT | MS_RDONLY, None) == 0, os.strerror(ctypes.get_errno())


def _refuse(monkeypatch, d: Path, read_only: bool) -> None:
    """Make the early check see ``d`` as the kernel would for an unprivileged user (root ignores a 0500 mode; a
    read-only mount needs root)."""
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == d and mode & os.W_OK
                        else real_access(p, mode, **k))
    if read_only:
        monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY) if Path(p) == d
                            else real_statvfs(p))


@pytest.fixture
def denied(tmp_path, monkeypatch):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    if os.geteuid() == 0:
        _refuse(monkeypatch, d, read_only=False)
    yield d
    d.chmod(0o700)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    if _libc.mount(b"tmpfs", os.fsencode(d), b"tmpfs", MS_RDONLY, b"size=64k") != 0:
        _refuse(monkeypatch, d, read_only=True)
        yield d
        return
    yield d
    _libc.umount2(os.fsencode(d), MNT_DETACH)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    return SharingPlan([0, 1, 1, 3, 3, 5]).save(tmp_path_factory.mktemp("plan") / "plan.json")


@pytest.fixture(scope="module")
def cal_dir(tiny_dir, tmp_path_factory):
    from kvtool.calibration.calibrate import calibrate

    out = tmp_path_factory.mktemp("cal") / "cal"
    calibrate(str(tiny_dir), samples=2, seq_len=16, out=out)
    return out


def _commands(tiny_dir, plan_file, stats) -> dict[str, tuple[str, Callable[[Path], list[str]]]]:
    """Each command that writes, the kind of output it writes, and its arguments for an output path."""
    t, p = str(tiny_dir), str(plan_file)
    small = ["--samples", "2", "--seq-len", "16"]
    return {
        "calibrate": ("dir", lambda o: ["calibrate", "--model", t, *small, "--out", str(o)]),
        "export": ("dir", lambda o: ["export", "--plan", p, "--model", t, "--out", str(o)]),
        "compress": ("dir", lambda o: ["compress", "--model", t, *small, "--out", str(o)]),
        "heal": ("dir", lambda o: ["heal", "--plan", p, "--model", t, "--tokens", "256", "--seq-len", "8",
                                   "--text", "calibration", "--out", str(o)]),
        "search": ("file", lambda o: ["search", "--stats", str(stats), "--out", str(o)]),
        "search --compare": ("file", lambda o: ["search", "--compare", "--stats", str(stats), "--json", str(o)]),
        "eval --json": ("file", lambda o: ["eval", "--plan", p, "--model", t, "--tasks", "ppl", "--ppl-samples", "1",
                                           "--ppl-seq-len", "8", "--json", str(o)]),
        "eval --plans --json": ("file", lambda o: ["eval", "--plans", p, "--model", t, "--ppl-samples", "1",
                                                   "--ppl-seq-len", "8", "--json", str(o)]),
    }


def _left_over(parent: Path, out: Path) -> list[str]:
    """What a refused write left beside (or at) ``out``."""
    return [q.name for q in parent.iterdir() if q.name.startswith(f".{out.name}") or q == out]


CASES = ["a file above", "permission denied", "read-only", "the wrong kind"]
COMMANDS = ["calibrate", "export", "compress", "heal", "search", "search --compare", "eval --json",
            "eval --plans --json"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_the_os_would_refuse_is_refused_before_any_work(tiny_dir, plan_file, tmp_path, request, case,
                                                                   command):
    kind, args = _commands(tiny_dir, plan_file, tmp_path / "no-stats")[command]
    if case == "a file above":
        (tmp_path / "afile").write_text("x")
        parent, words = tmp_path / "afile", ["is not a directory"]
    elif case == "permission denied":
        parent, words = request.getfixturevalue("denied"), ["permission denied"]
    elif case == "read-only":
        parent, words = request.getfixturevalue("read_only"), ["read-only file system"]
    else:
        parent = tmp_path
        words = ["exists and is not a directory"] if kind == "dir" else ["is a directory"]
    out = parent / ("out" if kind == "dir" else "out.json")
    if case == "the wrong kind":
        out.write_text("keep") if kind == "dir" else out.mkdir()
    r = CliRunner().invoke(app, args(out))
    _one_line(r, str(out), *words)
    if case == "the wrong kind":
        assert (out.read_text() == "keep") if kind == "dir" else not any(out.iterdir())
    elif parent.is_dir():
        assert _left_over(parent, out) == []


@pytest.mark.parametrize("command", ["calibrate", "export", "search", "search --compare", "eval --json",
                                     "eval --plans --json", "heal"])
def test_a_full_file_system_is_one_line_and_leaves_nothing(tiny_dir, plan_file, cal_dir, tmpfs, command):
    kind, args = _commands(tiny_dir, plan_file, cal_dir)[command]
    d = tmpfs("full")
    _fill(d)
    out = d / ("out" if kind == "dir" else "out.json")
    _one_line(CliRunner().invoke(app, args(out)), f"cannot write {out}", "No space left on device",
              "nothing was written")
    assert _left_over(d, out) == []


def test_the_sidecar_update_after_eval_on_a_full_or_read_only_export_is_one_line(tiny_dir, plan_file, tmpfs):
    from kvtool.io.export import export

    for how in ("full", "read-only"):
        d = tmpfs(how, size="16m")
        export(plan_file, out=d / "exp", model=str(tiny_dir))
        before = (d / "exp" / SIDECAR).read_bytes()
        _fill(d) if how == "full" else _remount_ro(d)
        r = CliRunner().invoke(app, ["eval", str(d / "exp"), "--tasks", "ppl", "--ppl-samples", "1",
                                     "--ppl-seq-len", "8"])
        _one_line(r, f"cannot write {d / 'exp' / SIDECAR}",
                  "No space left on device" if how == "full" else "Read-only file system")
        assert (d / "exp" / SIDECAR).read_bytes() == before
        assert [q.name for q in (d / "exp").iterdir() if q.name.startswith(".")] == []


def test_eval_plots_on_a_full_disk_or_a_file_is_one_line(tiny_dir, plan_file, cal_dir, tmpfs, tmp_path):
    base = ["eval", "--plan", str(plan_file), "--model", str(tiny_dir), "--tasks", "ppl", "--ppl-samples", "1",
            "--ppl-seq-len", "8", "--stats", str(cal_dir), "--plots"]
    d = tmpfs("full")
    _fill(d)
    _one_line(CliRunner().invoke(app, [*base, str(d / "plots")]), f"cannot write {d / 'plots'}",
              "No space left on device")
    assert not any((d / "plots").iterdir()) if (d / "plots").exists() else True
    (tmp_path / "plots").write_text("keep")
    _one_line(CliRunner().invoke(app, [*base, str(tmp_path / "plots")]), str(tmp_path / "plots"))
    frontier = ["eval", "--plans", str(plan_file), "--model", str(tiny_dir), "--ppl-samples", "1", "--ppl-seq-len",
                "8", "--plots"]
    _one_line(CliRunner().invoke(app, [*frontier, str(tmp_path / "plots")]), str(tmp_path / "plots"))
    assert (tmp_path / "plots").read_text() == "keep"
    _one_line(CliRunner().invoke(app, [*frontier, str(d / "frontier")]), f"cannot write {d / 'frontier'}",
              "No space left on device")


def _cache(tmpfs, how: str) -> tuple[Path, str]:
    """$KVTOOL_CACHE on a full (but for ``leave`` bytes) or read-only tmpfs, and the reason the OS gives."""
    d = tmpfs("cache")
    if how == "read-only":
        _remount_ro(d)
        return d, "Read-only file system"
    _fill(d, leave=8192)  # room for corpus.json, none for a shard
    return d, "No space left on device"


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_full_or_read_only_cache_while_sampling_the_corpus_is_one_line(tiny_dir, plan_file, tmpfs, tmp_path,
                                                                         monkeypatch, how):
    d, reason = _cache(tmpfs, how)
    monkeypatch.setenv("KVTOOL_CACHE", str(d))
    r = CliRunner().invoke(app, ["heal", "--plan", str(plan_file), "--model", str(tiny_dir), "--tokens", "256",
                                 "--seq-len", "32", "--out", str(tmp_path / "healed")])
    _one_line(r, str(d / "corpus"), reason)
    assert not (tmp_path / "healed").exists()
    assert [q.name for q in d.rglob("*") if q.suffix == ".tmp" or q.name.startswith(".")] in ([".fill"], [])


@pytest.mark.slow  # the guard in conftest counts any convert_gguf call (here on a tiny model, seconds)
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_full_or_read_only_cache_while_converting_a_gguf_is_one_line(tiny_dir, tmpfs, tmp_path, monkeypatch, how):
    import transformers

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):  # the GGUF reader is not the point
        real = auto.from_pretrained
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, _real=real, **k: _real(str(tiny_dir)))
    d, reason = _cache(tmpfs, how)
    if how == "full":
        (d / "models").mkdir()
    monkeypatch.setenv("KVTOOL_CACHE", str(d))
    r = CliRunner().invoke(app, ["generate", str(gguf), "hi", "--max-new-tokens", "1"])
    _one_line(r, str(d / "models"), reason)
    assert not (d / "models").exists() or [q.name for q in (d / "models").iterdir()] == []


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_force_over_an_output_on_a_full_disk_keeps_the_old_one(tiny_dir, plan_file, tmpfs, command):
    kind, args = _commands(tiny_dir, plan_file, None)[command]
    d = tmpfs("full")
    (d / "out").mkdir()
    (d / "out" / "old.txt").write_text("old")
    _fill(d)
    _one_line(CliRunner().invoke(app, [*args(d / "out"), "--force"]), f"cannot write {d / 'out'}",
              "No space left on device")
    assert [q.name for q in (d / "out").iterdir()] == ["old.txt"] and (d / "out" / "old.txt").read_text() == "old"
    assert _left_over(d, d / "out") == ["out"]


def test_a_failed_final_rename_restores_the_old_output(tiny_dir, plan_file, tmp_path, monkeypatch):
    from kvtool import atomic

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "out" and Path(src).name.endswith(".tmp"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    r = CliRunner().invoke(app, ["export", "--plan", str(plan_file), "--model", str(tiny_dir), "--out",
                                 str(tmp_path / "out"), "--force"])
    _one_line(r, f"cannot write {tmp_path / 'out'}: Input/output error")
    assert [q.name for q in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert _left_over(tmp_path, tmp_path / "out") == ["out"]


def test_an_unreadable_input_is_one_line_naming_it(tiny_dir, plan_file, cal_dir, tmp_path, monkeypatch):
    """Each JSON reader, on a file it may not read (mode 000; as root, which reads it anyway, a patched open)."""
    import shutil

    from kvtool.io.export import export

    exp = export(plan_file, out=tmp_path / "exp", model=str(tiny_dir))
    cal = _copy_cal(cal_dir, tmp_path / "cal")
    plan = tmp_path / "plan.json"
    shutil.copy(plan_file, plan)
    locked = [plan, exp / SIDECAR, cal / "calibration.json"]
    for f in locked:
        f.chmod(0)
    if os.geteuid() == 0:
        real = Path.open

        def refuse(self, *a, **k):
            if self in locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "open", refuse)
    runner = CliRunner()
    _one_line(runner.invoke(app, ["export", "--plan", str(plan), "--model", str(tiny_dir), "--out",
                                  str(tmp_path / "o")]), f"cannot read {plan}: Permission denied")
    _one_line(runner.invoke(app, ["generate", str(exp), "hi"]), f"cannot read {exp / SIDECAR}: Permission denied")
    _one_line(runner.invoke(app, ["export", "--recipe", str(exp / SIDECAR), "--out", str(tmp_path / "o")]),
              f"cannot read {exp / SIDECAR}: Permission denied")
    _one_line(runner.invoke(app, ["search", "--stats", str(cal), "--out", str(tmp_path / "p.json")]), str(cal),
              "Permission denied")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.json").exists()


# --- valid JSON, absurd content: a number past Python's digit limit, a huge file, wrong types deep inside ---------

LONG_INT = "1" * 5000  # json.loads raises ValueError (not JSONDecodeError) past 4300 digits


def _copy_cal(cal_dir: Path, to: Path, **meta) -> Path:
    import shutil

    shutil.copytree(cal_dir, to)
    m = json.loads((to / "calibration.json").read_text())
    (to / "calibration.json").write_text(json.dumps({**m, **meta}))
    return to


def test_a_number_too_long_or_a_huge_file_in_every_reader_is_one_line(tiny_dir, cal_dir, plan_file, tmp_path):
    from kvtool.io.export import export

    runner = CliRunner()
    (tmp_path / "plan.json").write_text('{"kv_source_layers": [0, ' + LONG_INT + "]}")
    _one_line(runner.invoke(app, ["export", "--plan", str(tmp_path / "plan.json"), "--model", str(tiny_dir),
                                  "--out", str(tmp_path / "o")]), "plan.json is damaged", "4300")
    with open(tmp_path / "huge.json", "wb") as f:  # sparse: no disk used
        f.truncate(65 * 2**20)
    _one_line(runner.invoke(app, ["export", "--plan", str(tmp_path / "huge.json"), "--model", str(tiny_dir),
                                  "--out", str(tmp_path / "o")]), "huge.json is too large")
    (tmp_path / "recipe.json").write_text('{"model": null, "search": {"target": ' + LONG_INT + "}}")
    _one_line(runner.invoke(app, ["export", "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "o")]),
              "recipe.json is damaged")
    exp = export(plan_file, out=tmp_path / "exp", model=str(tiny_dir))
    side = json.loads((exp / SIDECAR).read_text())
    (exp / SIDECAR).write_text(json.dumps(side)[:-1] + ', "metrics": {"x": ' + LONG_INT + "}}")
    _one_line(runner.invoke(app, ["generate", str(exp), "hi", "--max-new-tokens", "1"]), f"{SIDECAR} is damaged")
    cal = _copy_cal(cal_dir, tmp_path / "cal")
    (cal / "calibration.json").write_text('{"version": ' + LONG_INT + "}")
    _one_line(runner.invoke(app, ["search", "--stats", str(cal), "--out", str(tmp_path / "p.json")]), str(cal))
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("meta", [{"num_layers": "6"}, {"layer_types": [1, 2, 3, 4, 5, 6]},
                                  {"layer_types": ["full_attention"]}, {"samples": [[[]]]}, {"model_name": None},
                                  {"model": {"a": [1]}}, {"settings": 5}, {"sliding_window": "x"},
                                  {"model_fingerprint": True}, {"num_layers": 7}])
def test_calibration_json_with_wrong_types_is_one_line(cal_dir, tmp_path, meta):
    cal = _copy_cal(cal_dir, tmp_path / "cal", **meta)
    r = CliRunner().invoke(app, ["search", "--stats", str(cal), "--out", str(tmp_path / "p.json")])
    _one_line(r, str(cal))
    assert not (tmp_path / "p.json").exists()


def test_stats_of_the_wrong_shape_are_one_line(cal_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    cal = _copy_cal(cal_dir, tmp_path / "cal")
    t = load_file(cal / "stats.safetensors")
    t["dist_euclidean"] = t["dist_euclidean"][:3]
    save_file(t, cal / "stats.safetensors")
    r = CliRunner().invoke(app, ["search", "--stats", str(cal), "--out", str(tmp_path / "p.json")])
    _one_line(r, str(cal), "dist_euclidean has shape [3, 6], not 6 layers")


@pytest.mark.parametrize("extra", [{"details": 5}, {"details": {"model": [1]}}])
def test_a_plan_with_wrong_types_inside_is_one_line(tiny_dir, tmp_path, extra):
    (tmp_path / "plan.json").write_text(json.dumps({"kv_source_layers": [0, 1, 1, 3, 3, 5], **extra}))
    r = CliRunner().invoke(app, ["export", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o")])
    _one_line(r, "plan")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"text": ' + LONG_INT + "}"])
def test_calibration_data_too_deep_or_too_long_is_one_line(tiny_dir, tmp_path, line):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    r = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--data", str(tmp_path / "data.jsonl"),
                                 "--out", str(tmp_path / "out")])
    _one_line(r, "data.jsonl:2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["[" * 100_000 + "]" * 100_000, '{"model_type": ' + LONG_INT + "}", "[1]"])
def test_an_exports_config_json_that_is_absurd_is_one_line(tiny_dir, plan_file, tmp_path, config):
    from kvtool.io.export import export

    exp = export(plan_file, out=tmp_path / "exp", model=str(tiny_dir))
    (exp / "config.json").write_text(config)
    _one_line(CliRunner().invoke(app, ["generate", str(exp), "hi", "--max-new-tokens", "1"]), "config.json")


@pytest.mark.parametrize("errno", [13, 20, 21, 28, 30, 122])  # EACCES ENOTDIR EISDIR ENOSPC EROFS EDQUOT
def test_each_write_the_os_refuses_is_one_kvtool_error_and_leaves_nothing(tmp_path, monkeypatch, errno):
    from kvtool import atomic

    def refuse(*a, **k):
        raise OSError(errno, os.strerror(errno))

    class SafetensorError(Exception):
        pass

    def says(name: str) -> str:
        return re.escape(f"cannot write {tmp_path / name}: {os.strerror(errno)}; nothing was written")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fsync", refuse)
        with pytest.raises(KvtoolError, match=says("f.json")):
            atomic.write_json_atomic(tmp_path / "f.json", {"a": 1})
    with pytest.raises(KvtoolError, match=says("d")), atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno)} (os error {errno})")
    with pytest.raises(KeyError), atomic.atomic_dir(tmp_path / "d"):  # a bug is not reworded
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []
