"""``kvtool serve`` answering an ordinary OpenAI client on loopback, with greedy text equal to the engine run offline
and to ``kvtool generate``; bad requests get the server's own errors and the server stays up."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest
from conftest import KVTOOL, engine
from transformers import AutoTokenizer

PROMPT = "The three primary colours are"
MESSAGES = [{"role": "user", "content": "Name a fruit that is yellow."}]
NEW = 16
MAX_LEN = 512


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2):
    """``kvtool serve`` in its own process group, stopped with SIGINT (Ctrl-C) after the module's tests."""
    port = _port()
    proc = subprocess.Popen([KVTOOL, "serve", str(smollm2), "--port", str(port), "--kv-cache-memory", "64MiB",
                             "--max-model-len", str(MAX_LEN), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 600
    while not any(x.startswith("KV cache") for x in seen):
        assert proc.poll() is None, "".join(seen)
        assert time.monotonic() < deadline, "kvtool serve did not come up in 600 s"
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    yield {"port": port, "proc": proc, "output": seen, "lines": lines, "model": smollm2.name, "dir": smollm2}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused", timeout=120,
                         max_retries=0)


def test_prints_capacity_beside_the_base(server):
    text = " ".join(server["output"])
    m = re.search(r"([\d,]+) blocks × 128 = ([\d,]+) tokens.*base would get ([\d,]+) blocks", text, re.S)
    assert m, text
    shared, base = int(m.group(1).replace(",", "")), int(m.group(3).replace(",", ""))
    assert abs(shared * 21 / 30 - base) < 1  # 21 of 30 layers hold KV


def test_greedy_text_equals_the_engine_offline_and_kvtool_generate(server, tmp_path):
    c = _client(server)
    extra = {"ignore_eos": True}
    comp = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=NEW, temperature=0,
                                extra_body=extra).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=server["model"], prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True, extra_body=extra))
    chat = c.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=NEW, temperature=0,
                                     extra_body=extra).choices[0].message.content
    chat_streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=server["model"], messages=MESSAGES, max_tokens=NEW, temperature=0, stream=True, extra_body=extra))
    assert streamed == comp and chat_streamed == chat
    chat_ids = AutoTokenizer.from_pretrained(server["dir"]).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    offline = engine(server["dir"], tmp_path, max_model_len=MAX_LEN, kv_cache_memory_bytes=64 * 2**20,
                     greedy={"prompts": [PROMPT, list(chat_ids)], "max_tokens": NEW})
    assert offline["returncode"] == 0, offline.get("error")
    assert offline["greedy_text"] == [comp, chat]
    kv = subprocess.run([KVTOOL, "generate", str(server["dir"]), PROMPT, "--raw", "--max-new-tokens", str(NEW)],
                        capture_output=True, text=True, timeout=600)
    assert kv.returncode == 0, kv.stderr
    assert kv.stdout.strip() == comp.strip()


def test_bad_requests_get_the_servers_errors_and_it_stays_up(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=server["model"], prompt="word " * (MAX_LEN + 100), max_tokens=4)
    ok = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=4, temperature=0)
    assert ok.choices[0].text and server["proc"].poll() is None


def test_ctrl_c_shuts_it_down_cleanly(server):
    proc = server["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:  # say what was still running and what it printed, then stop it
        tree = subprocess.run(["ps", "-eo", "pid,pgid,stat,etime,args", "--forest"], capture_output=True, text=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        code = None
    rest = []
    while not server["lines"].empty():
        rest.append(server["lines"].get())
    assert code == 0, f"exit {code}; it printed:\n{''.join(rest)[-3000:]}" + (
        f"\nprocesses 120 s after Ctrl-C:\n{tree.stdout[-3000:]}" if code is None else "")
    assert "stopped" in "".join(rest)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server["port"]), timeout=2):
        pass
