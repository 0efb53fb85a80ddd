"""``kvtool eval EXPORT --engine vllm``: base and shared side by side in fresh engines, figures checked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import KVTOOL


def fp8_kv_on_this_cpu() -> bool:
    """vLLM's CPU backend has an fp8 KV cache only on x86 with AVX-512 or AMX."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512f" in flags or "amx_tile" in flags


def test_eval_engine_reports_checked_capacity_and_logprobs(fx, tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([KVTOOL, "eval", str(fx["root"] / "gemma3_text" / "shared"), "--engine", "vllm",
                        "--kv-cache-memory", "16MiB", "--engine-prompt", "96", "--engine-new", "32",
                        "--ppl-samples", "2", "--ppl-seq-len", "64", "--json", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    en = json.loads(out.read_text())["tasks"]["engine"]
    fp8 = fp8_kv_on_this_cpu()
    assert all(c["ok"] for c in en["checks"]) and len(en["checks"]) == 3 + fp8  # block ratios, 2 log-prob gaps
    rows = en["rows"]
    layers, owners = fx["archs"]["gemma3_text"]["layers"], fx["archs"]["gemma3_text"]["owners"]
    assert en["block_ratio_limit"] == layers / owners
    assert abs(rows["shared"]["num_blocks"] * owners / layers - rows["base"]["num_blocks"]) < 1
    assert rows["shared"]["max_logprob_gap"] < 1e-4 and rows["shared"]["greedy_equal"] == en["greedy_prompts"]
    assert abs(rows["shared"]["ppl"] / rows["shared"]["ppl_kvtool"] - 1) < 1e-4
    if fp8:
        assert rows["shared+fp8"]["num_blocks"] == 4 * rows["shared"]["num_blocks"]  # 1 byte per entry, not 4
        assert "KV fp8: held-out ppl" in r.stdout
    else:  # said, not dropped: the engine's own reason is in the report and the table
        assert "shared+fp8" not in rows and "AVX-512" in en["unsupported_kv_cache_dtypes"]["fp8"]
        assert "KV fp8: not available on this machine" in r.stdout
    assert [t["batch"] for t in rows["base"]["throughput"]] == [t["batch"] for t in rows["shared"]["throughput"]] \
        == sorted({rows["base"]["requests_that_fit"], rows["shared"]["requests_that_fit"]})
    assert "KV blocks (128 tokens)" in r.stdout
