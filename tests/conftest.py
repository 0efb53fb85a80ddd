"""Shared fixtures, and the two test lanes.

``slow`` marks a test that uses the real SmolLM2 model or starts a process (``pytest -m "not slow"`` is the fast
lane, ``-m slow`` the slow one; ``.ci/run`` runs both). Every test that uses a fixture in ``SLOW_FIXTURES`` is marked
here, so a new test on the real model needs no marker of its own. A test that starts a process (``subprocess``,
``multiprocessing``, the CLI as a program, the probe's child Python, a server, a vLLM engine) or converts the
default model without being marked fails with a message saying so: give it ``@pytest.mark.slow``."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest
import torch

# at most 2 threads; under pytest-xdist (`-n N`, .ci/run) the cores are split between the N workers
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# fixtures whose tests are slow: the real embedded model (converted once, ~1 GB of float32 weights in memory)
SLOW_FIXTURES = frozenset({"smollm2"})


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the kvtool cache)."""
    import kvtool

    return kvtool.load()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama with a tokenizer, loadable by path."""
    from kvtool.io.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", vocab_size=128)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- the guard: what an unmarked test did that belongs in the slow lane ---------------------------------------------
_current: list = [None]  # the test being run (set up, run, torn down), whose slow work is recorded
_slow_work: dict[str, list[str]] = {}


def _record(what: str) -> None:
    if _current[0] is not None:
        _slow_work.setdefault(_current[0], []).append(what)


def _wrap(owner, name: str, describe) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        _record(describe(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def pytest_configure(config):
    try:  # the first matplotlib import on a machine lists its fonts (`fc-list`): the machine's work, not a test's
        import matplotlib.font_manager  # noqa: F401
    except ImportError:
        pass
    _wrap(subprocess.Popen, "_execute_child", lambda self, args, *a, **k: f"started a process: {str(args)[:160]}")
    _wrap(multiprocessing.process.BaseProcess, "start", lambda self: f"started a process: multiprocessing {self!r}")
    try:  # the default model's conversion (a module global, so resolve_model calls the wrapper)
        import kvtool.io.loading as loading
    except Exception:  # noqa: BLE001 - a broken import fails its own tests; the process guard still holds
        return
    _wrap(loading, "convert_gguf", lambda gguf, *a, **k: f"loaded the real model {getattr(gguf, 'name', gguf)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    work = _slow_work.pop(item.nodeid, [])
    if work and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} is not marked slow but (it or a fixture it set up) "
                    + "; ".join(dict.fromkeys(work)) + " - give it @pytest.mark.slow (tests/conftest.py)",
                    pytrace=False)
    return result
