"""Shared pieces of the plugin's tests, which run in the vLLM environment (``.venv-vllm``).

Their inputs come from kvtool itself, in kvtool's environment (``$KVTOOL_PYTHON``, default the repository's
``.venv``): tiny exports of every architecture with ``kvtool.load``'s outputs (``kvtool_fixtures.py``). Every engine
runs in a fresh process (``python -m kvtool_vllm.measure``, in-process engine start), bounded in time.

Under pytest-xdist (``.ci/run``: ``-n 2 --dist loadscope``) the fixture tree is made once for all workers, each
worker's engines are bound to its own core, and the tests that reuse one architecture's cached engine runs
(``standard_run``), or the SmolLM2 export and its server, stay on one worker (``_scope``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from kvtool_vllm import BASES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KVTOOL_PYTHON = os.environ.get("KVTOOL_PYTHON") or str(REPO / ".venv" / "bin" / "python")
KVTOOL = str(Path(KVTOOL_PYTHON).with_name("kvtool"))
KV_MEMORY = 16 * 2**20
MAX_LEN = 128
_RESULTS: dict[tuple, dict] = {}
# fixtures that start processes (kvtool's fixture tree, the SmolLM2 export, a server): their tests are `slow`
SLOW_FIXTURES = frozenset({"fx", "smollm2", "server"})


WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist, else None
if WORKER and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # vLLM's CPU backend binds its OpenMP threads to every core by default; two workers' engines on the same cores
    # spin against each other, so each worker's engines (and servers) get one core of their own
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(WORKER[2:]) % (os.cpu_count() or 1)))


def _scope(nodeid: str) -> str:
    """The xdist scope of a test: one per architecture for the tests parametrised by it (they reuse its cached
    engine runs, ``standard_run``), one for the SmolLM2 server's module, else the test alone."""
    path, _, name = nodeid.partition("::")
    if path.endswith("test_serve.py"):
        return "smollm2-server"
    arch = name.partition("[")[2].split("-")[0].rstrip("]")
    return f"arch-{arch}" if arch in BASES else nodeid


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with ``_scope``'s scopes (pytest-xdist's ``xdist_group`` marker does not take effect
    with pytest 9: it renames a node id attribute that pytest no longer reads)."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    if not callable(getattr(LoadScopeScheduling, "_split_scope", None)):
        raise pytest.UsageError("pytest-xdist's LoadScopeScheduling has no _split_scope: update tests/conftest.py")

    class ByEngineRun(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ByEngineRun(config, log)


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> dict:
    """The fixture tree and its manifest (made once per run by kvtool, shared by the xdist workers)."""
    shared = tmp_path_factory.getbasetemp().parent if WORKER else tmp_path_factory.getbasetemp()
    out = shared / "kvtool-fixtures"
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a run that died half-way
            subprocess.run([KVTOOL_PYTHON, str(HERE / "kvtool_fixtures.py"), str(out)], check=True, timeout=600,
                           stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["root"] = out
    return manifest


def engine(model: Path | str, tmp: Path, *, env: dict | None = None, timeout: float = 300, **job) -> dict:
    """One fresh engine on ``model`` (``kvtool_vllm.measure``); its result, or ``{"error": ...}``."""
    job = {"model": str(model), "dtype": "float32", "kv_cache_memory_bytes": KV_MEMORY, "max_model_len": MAX_LEN,
           **job}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    with open(tmp / "engine.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "kvtool_vllm.measure", str(tmp / "job.json"), str(tmp / "out.json")],
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})})
    res = json.loads((tmp / "out.json").read_text()) if (tmp / "out.json").is_file() else {}
    res["returncode"] = r.returncode
    res["log"] = (tmp / "engine.log").read_text()
    return res


def standard_run(fx: dict, arch: str, kind: str, tmp_path_factory) -> dict:
    """Greedy tokens and held-out log-probabilities of one fixture model (cached for the session)."""
    key = (arch, kind)
    if key not in _RESULTS:
        _RESULTS[key] = engine(fx["root"] / arch / kind, tmp_path_factory.mktemp(f"{arch}-{kind}"),
                               greedy={"prompts": fx["prompts"], "max_tokens": fx["new_tokens"]},
                               prompt_logprobs=fx["logprob_ids"])
        assert _RESULTS[key]["returncode"] == 0, _RESULTS[key].get("error")
    return _RESULTS[key]


def until_eos(ids: list[int], eos: int = 2) -> list[int]:
    """Tokens up to and including the first end-of-sequence (vLLM runs with ignore_eos, transformers stops)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported by kvtool with 9 of 30 layers sharing (made once per session)."""
    out = tmp_path_factory.mktemp("smollm2") / "export"
    subprocess.run([KVTOOL_PYTHON, str(HERE / "kvtool_fixtures.py"), "--smollm2", str(out)], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    return out
