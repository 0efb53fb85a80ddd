"""kvtool's side of serving in vLLM, without vLLM: finding its environment, the capacity and log-probability checks
(on engine results faked here; the real engine runs in integrations/vllm/tests), and the CLI's one-line refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

import kvtool
from kvtool.cli import app
from kvtool.crosslayer.runtime import sharing_state
from kvtool.errors import CheckFailed, KvtoolError
from kvtool.evaluation import engine as engine_mod
from kvtool.evaluation.evaluate import evaluate
from kvtool.formats.cache_size import engine_blocks, kv_page_bytes
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.vllm_env import EngineFailed, cpu_thread_binding, vllm_python
from kvtool.serving import ServeSettings, _cache_info, capacity, stop_signals


@pytest.fixture
def shared_dir(tiny_dir, tmp_path):
    m, tok = kvtool.load(tiny_dir)
    export(SharingPlan([0, 0, 2, 2, 4, 4]), model=m, tokenizer=tok, out=tmp_path / "exp")  # 3 of 6 own KV
    return tmp_path / "exp"


@pytest.mark.slow
def test_vllm_python_refuses_an_interpreter_without_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTOOL_VLLM_PYTHON", raising=False)
    with pytest.raises(KvtoolError, match="cannot import vllm and the kvtool_vllm plugin: run `bash .ci/install"):
        vllm_python(sys.executable)  # kvtool's own environment has no vLLM
    with pytest.raises(KvtoolError, match="not an executable Python"):
        vllm_python(tmp_path / "python")
    monkeypatch.setenv("KVTOOL_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(KvtoolError, match="not an executable Python"):
        vllm_python()


def test_cpu_thread_binding(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_thread_binding(1) == {}
    assert cpu_thread_binding(2) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    with pytest.raises(KvtoolError, match="needs as many CPU cores"):
        cpu_thread_binding(8)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert cpu_thread_binding(2) == {}  # the user's own binding is kept


def test_serve_capacity_is_checked_against_the_map(shared_dir):
    s = ServeSettings(kv_cache_memory=16 * 2**20, max_model_len=128, dtype="float32")
    page = kv_page_bytes(128, 2, 16, 4)  # tiny llama: 2 KV heads of 16 dims, float32
    good = {"block_size": "128", "num_gpu_blocks": str(engine_blocks(16 * 2**20, page, 3))}
    cap = capacity(shared_dir, good, s)
    assert cap["base_num_blocks"] == engine_blocks(16 * 2**20, page, 6) == 85
    assert cap["num_blocks"] == 170 and cap["kv_tokens"] == 170 * 128 and cap["max_concurrency"] == 170.0
    with pytest.raises(KvtoolError, match="vLLM allocated 85 KV blocks, the map .* implies 170.*not in effect"):
        capacity(shared_dir, {**good, "num_gpu_blocks": "85"}, s)  # as if every layer held a cache


def test_cache_info_is_read_from_metrics():
    text = ('# HELP x\nvllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",num_gpu_blocks="65"} '
            '1.0\n')
    assert _cache_info(text)["num_gpu_blocks"] == "65"
    with pytest.raises(KvtoolError, match="no vllm:cache_config_info"):
        _cache_info("vllm:other 1\n")


def _fake_engine(monkeypatch, blocks: dict[str, int], gap: float = 0.0):
    """Engine results as vLLM would give them, computed from kvtool's own model (plus ``gap`` nats)."""
    monkeypatch.setattr(engine_mod, "check_export", lambda py, d: {"layers": 6, "owners": 3, "merge": None})
    monkeypatch.setattr(engine_mod, "vllm_python", lambda p: "python")

    def run(python, job, **kw):
        which = "shared" if job["model"].endswith("exp") else "base"
        if job["kv_cache_dtype"] not in ("auto", *[k.split("+")[1] for k in blocks if "+" in k]):
            raise EngineFailed("the vLLM engine on X failed: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.",
                               "FP8 KV cache on CPU requires x86 with AVX-512 or AMX.")
        n = blocks[which if job["kv_cache_dtype"] == "auto" else f"{which}+{job['kv_cache_dtype']}"]
        res = {"vllm": "fake", "kv_cache_dtype": job["kv_cache_dtype"], "block_size": 128, "num_blocks": n,
               "kv_tokens": n * 128, "max_concurrency": n * 128 / job["max_model_len"]}
        if job.get("prompt_logprobs"):
            res["prompt_logprobs"] = [[x - gap for x in r] for r in REF[which]["logprobs"]]
        if job.get("greedy"):
            res["greedy"] = REF[which]["greedy"]
        if job.get("throughput"):
            res["throughput"] = [{**t, "seconds": 1.0, "generated": 1, "gen_tok_s": 1.0} for t in job["throughput"]]
        return res

    REF: dict = {}
    real = engine_mod._token_logprobs, engine_mod._greedy

    def keep_lp(model, ids):
        out = real[0](model, ids)
        REF.setdefault("shared" if sharing_state(model) else "base", {})["logprobs"] = out
        return out

    def keep_greedy(model, tok, prompts, new):
        out = real[1](model, tok, prompts, new)
        REF.setdefault("shared" if sharing_state(model) else "base", {})["greedy"] = out
        return out

    monkeypatch.setattr(engine_mod, "_token_logprobs", keep_lp)
    monkeypatch.setattr(engine_mod, "_greedy", keep_greedy)
    monkeypatch.setattr(engine_mod, "run_engine_job", run)


SMALL = {"engine": {"samples": 2, "seq_len": 32, "gen_new": 4, "prompt": 32, "new": 8}}


def test_engine_task_reports_ratio_gap_and_throughput(shared_dir, monkeypatch, tmp_path):
    _fake_engine(monkeypatch, {"base": 42, "shared": 85, "base+fp8": 170, "shared+fp8": 341})
    rep = evaluate(shared_dir, tasks=("engine",), options=SMALL, json_out=tmp_path / "r.json")
    en = rep["tasks"]["engine"]
    assert all(c["ok"] for c in en["checks"]) and en["rows"]["shared"]["block_ratio"] == pytest.approx(85 / 42)
    assert en["rows"]["shared"]["max_logprob_gap"] == 0 and en["rows"]["shared"]["greedy_equal"] == 4
    assert en["rows"]["shared+fp8"]["num_blocks"] == 341
    assert [t["batch"] for t in en["rows"]["base"]["throughput"]] == [42, 85]  # 40 tokens fit in one block
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["engine"]["rows"]["base"]["num_blocks"] == 42


def test_engine_task_says_which_kv_dtype_this_machine_lacks(shared_dir, monkeypatch, tmp_path):
    _fake_engine(monkeypatch, {"base": 42, "shared": 85})
    rep = evaluate(shared_dir, tasks=("engine",), options=SMALL)
    en = rep["tasks"]["engine"]
    assert set(en["rows"]) == {"base", "shared"} and "AVX-512" in en["unsupported_kv_cache_dtypes"]["fp8"]
    assert all(c["ok"] for c in en["checks"]) and len(en["checks"]) == 3  # no fp8 figure to check
    import kvtool.cli

    rendered = Console(width=80, record=True)  # CI's width: the line must not wrap or be cut
    monkeypatch.setattr(kvtool.cli, "out", rendered)
    kvtool.cli._print_report(rep, None)
    assert f"KV fp8: not available on this machine: {en['unsupported_kv_cache_dtypes']['fp8']}" \
        in rendered.export_text()


@pytest.mark.parametrize(("blocks", "gap", "words"), [
    ({"base": 42, "shared": 42, "base+fp8": 170, "shared+fp8": 341}, 0.0,
     "vLLM allocated 42 KV blocks for the shared model and 42 for the base"),
    ({"base": 42, "shared": 85, "base+fp8": 170, "shared+fp8": 170}, 0.0, r"170 for the base \(fp8\)"),
    ({"base": 42, "shared": 85, "base+fp8": 170, "shared+fp8": 341}, 0.01,
     "differ from kvtool.load.s by up to 0.01 nats per token"),
])
def test_engine_task_refuses_a_figure_the_plan_does_not_imply(shared_dir, monkeypatch, tmp_path, blocks, gap, words):
    _fake_engine(monkeypatch, blocks, gap)
    with pytest.raises(CheckFailed, match=words) as e:
        evaluate(shared_dir, tasks=("engine",), options=SMALL, json_out=tmp_path / "r.json")
    assert (tmp_path / "r.json").is_file() and "engine" in e.value.report["tasks"]  # written before refusing


@pytest.mark.slow
def test_cli_refusals_are_one_line(shared_dir, tmp_path):
    r = CliRunner().invoke(app, ["serve", str(shared_dir), "--vllm-python", str(tmp_path / "py")])
    assert r.exit_code == 2 and "not an executable Python" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(app, ["eval", str(shared_dir), "--engine", "sglang"])
    assert r.exit_code == 2 and "the engine kvtool drives is vllm" in r.output
    r = CliRunner().invoke(app, ["eval", "--plan", str(tmp_path / "p.json"), "--engine", "vllm",
                                 "--vllm-python", sys.executable])
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_stop_signals_stop_even_where_sigint_was_inherited_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored: `kvtool serve` must still stop on
    Ctrl-C (and on SIGTERM), and put the old handlers back."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt), stop_signals():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the signal arrives at once; this is never reached
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_process_dies_with_kvtool(tmp_path):
    """If `kvtool serve` is killed outright (SIGKILL, no chance to stop the server), the server goes too."""
    code = ("import sys, time; from kvtool.serving import Server; "
            "s = Server([sys.executable, '-c', 'import time; time.sleep(120)'], {}, None); "
            "print(s.proc.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the server outlived kvtool by 10 s")
    finally:
        parent.kill()
        parent.wait(10)
