"""``kvtool serve EXPORT``: vLLM's OpenAI-compatible server on loopback, in the vLLM environment with the
``kvtool_vllm`` plugin, so the export runs with sharing on and its consumers hold no KV blocks.

The export is checked by the plugin before the engine starts (one line if vLLM cannot serve it). Once the server
answers, the KV capacity vLLM allocated is read from its own ``/metrics`` and set beside what the base model would get
in the same memory; a block count that disagrees with the map stops the server with an error. Ctrl-C, SIGTERM (or
``stop``) shut the server down and wait for it, bounded in time, also where kvtool was started with SIGINT ignored
(a background job of a non-interactive shell); on Linux the server also gets SIGTERM if kvtool itself dies."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import engine_blocks, kv_page_bytes
from kvtool.io.vllm_env import check_export, cpu_thread_binding, vllm_python
from kvtool.progress import Log, silent

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    kv_cache_memory: int = 256 * 2**20  # bytes of KV cache (per tensor-parallel worker)
    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    served_model_name: str | None = None  # default: the export directory's name
    startup_timeout: float = 600.0
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM's server as they are


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def capacity(export_dir: str | Path, metrics: dict[str, str], s: ServeSettings) -> dict[str, Any]:
    """The engine's KV capacity (from its ``cache_config_info``) and the base's in the same memory, checked
    against the map: ``engine_blocks`` for the owners must be what vLLM allocated."""
    cfg = json.loads((Path(export_dir) / "config.json").read_text())
    src = cfg["kv_source_layers"]
    layers, owners = len(src), sum(1 for j, x in enumerate(src) if x == j)
    block = int(metrics["block_size"])
    blocks = int(metrics["num_gpu_blocks"])
    kv_dtype = s.kv_cache_dtype if s.kv_cache_dtype != "auto" else s.dtype
    heads = max(1, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // s.tensor_parallel_size)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    page = kv_page_bytes(block, heads, head_dim, _DTYPE_BYTES[kv_dtype])
    one_type = len(set(cfg.get("layer_types") or ["full_attention"])) == 1
    out = {"block_size": block, "num_blocks": blocks, "kv_tokens": blocks * block,
           "max_concurrency": blocks * block / s.max_model_len, "layers": layers, "owners": owners,
           "kv_cache_dtype": kv_dtype}
    if one_type:  # vLLM divides the memory evenly among the layers that hold a cache
        want = engine_blocks(s.kv_cache_memory, page, owners)
        if blocks != want:
            raise KvtoolError(f"vLLM allocated {blocks} KV blocks, the map ({owners} of {layers} layers hold KV) "
                              f"implies {want} in {s.kv_cache_memory / 2**20:g} MiB: sharing is not in effect")
        base = engine_blocks(s.kv_cache_memory, page, layers)
        out.update(base_num_blocks=base, base_kv_tokens=base * block,
                   base_max_concurrency=base * block / s.max_model_len)
    return out


def _dies_with_parent():
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so
    a killed ``kvtool serve`` leaves no server behind; elsewhere ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def set_death_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1

    return set_death_signal


class Server:
    """A running vLLM server process; its output is echoed (to ``echo``) and the last lines kept for errors."""

    def __init__(self, cmd: list[str], env: dict[str, str], echo) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True, preexec_fn=_dies_with_parent())
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader = threading.Thread(target=self._read, args=(echo,), daemon=True)
        self._reader.start()

    def _read(self, echo) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            if echo is not None:
                echo(line)

    def cause(self) -> str:
        """The most telling line of what the server printed: the plugin's refusal, else its last error."""
        lines = list(self.tail)
        for pat in (r"KvtoolVllmError: (.*)", r"(?:Error|Exception): (.*)"):
            found = [m.group(1) for x in lines if (m := re.search(pat, x))]
            if found:
                return found[-1].strip()
        return lines[-1] if lines else "no output"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT to the server's process group (as Ctrl-C), then SIGKILL after ``timeout`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URL we built
        return r.read().decode()


def _cache_info(metrics_text: str) -> dict[str, str]:
    line = next((x for x in metrics_text.splitlines() if x.startswith("vllm:cache_config_info{")), None)
    if line is None:
        raise KvtoolError("the vLLM server's /metrics has no vllm:cache_config_info; cannot check its KV capacity")
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def start(export_dir: str | Path, s: ServeSettings, *, python: str | None = None, echo=None,
          log: Log | None = None) -> tuple[Server, dict[str, Any]]:
    """Start the server and wait until it answers; returns it with its checked capacity. The caller stops it."""
    say = log or silent
    export_dir = Path(export_dir)
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        raise KvtoolError(f"kvtool serve listens on loopback only (127.0.0.1), not {s.host}")
    py = vllm_python(python)
    info = check_export(py, export_dir)
    if info.get("merge"):
        say(f"note: the export's prompt-KV merging ({info['merge'].get('method')}, budget "
            f"{info['merge'].get('budget')}) has no vLLM form; vLLM serves it without merging")
    name = s.served_model_name or export_dir.resolve().name
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir), "--served-model-name", name,
           "--host", s.host, "--port", str(s.port), "--dtype", s.dtype, "--kv-cache-memory-bytes",
           str(s.kv_cache_memory), "--kv-cache-dtype", s.kv_cache_dtype, "--max-model-len", str(s.max_model_len),
           "--tensor-parallel-size", str(s.tensor_parallel_size), *s.extra_args]
    env = {**os.environ, **cpu_thread_binding(s.tensor_parallel_size)}
    server = Server(cmd, env, echo)
    base = f"http://{s.host}:{s.port}"
    deadline = time.monotonic() + s.startup_timeout
    try:
        while True:
            if server.proc.poll() is not None:
                server.stop()
                raise KvtoolError(f"the vLLM server exited (status {server.proc.returncode}): {server.cause()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                _get(f"{base}/health", timeout=2)
                break
            if time.monotonic() > deadline:
                raise KvtoolError(f"the vLLM server did not answer within {s.startup_timeout:.0f} s")
            time.sleep(0.5)
        cap = capacity(export_dir, _cache_info(_get(f"{base}/metrics")), s)
    except BaseException:
        server.stop()
        raise
    cap.update(url=f"{base}/v1", model=name, vllm_python=py, merge=info.get("merge"))
    return server, cap


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` inside (in the main thread; elsewhere nothing changes), whatever
    they were before: a process started as a background job of a non-interactive shell inherits SIGINT ignored, and
    Ctrl-C would not stop the server. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(export_dir: str | Path, s: ServeSettings, *, python: str | None = None, on_ready=None, echo=None,
          log: Log | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM (0), or until it exits on its own (an error)."""
    with stop_signals():
        server, cap = start(export_dir, s, python=python, echo=echo, log=log)
        if on_ready is not None:
            on_ready(cap)
        try:
            while server.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            server.stop()
            return 0
        server.stop()
    raise KvtoolError(f"the vLLM server exited (status {server.proc.returncode}): {server.cause()}")

