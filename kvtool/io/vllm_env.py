"""The vLLM environment kvtool drives from outside: vLLM pins transformers below kvtool's range, so it lives in its
own interpreter (``.ci/install --vllm`` builds ``.venv-vllm``) with the ``kvtool_vllm`` plugin, and kvtool talks to
it through that plugin's command-line entry points and JSON files only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError

_REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
_FIX = "run `bash .ci/install --vllm` (it builds .venv-vllm) or pass --vllm-python PATH"


def vllm_python(explicit: str | os.PathLike | None = None) -> str:
    """The interpreter that has vLLM and the plugin: ``explicit``, else ``$KVTOOL_VLLM_PYTHON``, else this one if it
    has both, else the ``.venv-vllm`` beside kvtool's source tree."""
    chosen = explicit or os.environ.get("KVTOOL_VLLM_PYTHON")
    if chosen is None:
        if importlib.util.find_spec("vllm") and importlib.util.find_spec("kvtool_vllm"):
            return sys.executable
        chosen = _REPO_VENV
        if not chosen.exists():
            raise KvtoolError(f"no vLLM environment found: {_FIX}")
    path = Path(chosen).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise KvtoolError(f"--vllm-python {path} is not an executable Python")
    probe = subprocess.run([str(path), "-c", "import vllm, kvtool_vllm; print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise KvtoolError(f"{path} cannot import vllm and the kvtool_vllm plugin: {_FIX}")
    return str(path)


def check_export(python: str, export_dir: str | os.PathLike) -> dict[str, Any]:
    """The plugin's own check of an export (config, map, safetensors headers), before any engine starts."""
    r = subprocess.run([python, "-m", "kvtool_vllm", "check", str(export_dir)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()] or [f"exit status {r.returncode}"]
        raise KvtoolError(f"vLLM cannot serve {export_dir}: {lines[-1].removeprefix('error: ')}")
    return json.loads(r.stdout)


def run_engine_job(python: str, job: dict[str, Any], *, timeout: float = 1800, log: str | os.PathLike | None = None,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one engine in a fresh process (``python -m kvtool_vllm.measure``) and return its JSON result; its log
    goes to ``log`` (kept when the job fails, so nothing is lost)."""
    with tempfile.TemporaryDirectory(prefix="kvtool-engine-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        log_path = Path(log) if log else Path(tmp) / "engine.log"
        with open(log_path, "w") as fh:
            try:
                r = subprocess.run([python, "-m", "kvtool_vllm.measure", str(job_file), str(out_file)], stdout=fh,
                                   stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})})
            except subprocess.TimeoutExpired:
                raise KvtoolError(f"the vLLM engine on {job['model']} did not finish within {timeout:.0f} s") from None
        res = json.loads(out_file.read_text()) if out_file.is_file() else {}
        if r.returncode != 0 or "error" in res:
            where = f" (log: {log})" if log else ""
            reason = res.get("error") or f"exit status {r.returncode}"
            raise EngineFailed(f"the vLLM engine on {job['model']} failed: {reason}{where}", reason)
        return res


class EngineFailed(KvtoolError):
    """A vLLM engine job that started and failed; ``reason`` is the engine's own message."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def cpu_thread_binding(tensor_parallel_size: int) -> dict[str, str]:
    """vLLM's CPU backend binds each tensor-parallel worker to a NUMA node and refuses more workers than nodes;
    ``VLLM_CPU_OMP_THREADS_BIND`` splits this process's cores among them instead (``0|1`` on two cores). Ignored by
    GPU backends; a value the user set is kept."""
    if tensor_parallel_size <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise KvtoolError(f"tensor parallel size {tensor_parallel_size} needs as many CPU cores; "
                          f"this process may use {len(cores)}")
    per = len(cores) // tensor_parallel_size
    groups = [cores[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups)}
