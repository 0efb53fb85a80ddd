"""The plugin on tiny random models of every architecture kvtool exports, each engine fresh (vLLM's CPU build)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import KV_MEMORY, engine, standard_run, until_eos

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def test_every_kvtool_architecture_is_covered(fx):
    """The fixtures are made from kvtool's own list of architectures; the plugin must know each."""
    from kvtool_vllm import BASES

    assert set(fx["archs"]) == set(ARCHS) == set(BASES)


def test_register_is_idempotent():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    import kvtool_vllm

    kvtool_vllm.register()
    kvtool_vllm.register()  # every vLLM process runs it, maybe more than once
    archs = ModelRegistry.get_supported_archs()
    for base in kvtool_vllm.BASES:
        assert kvtool_vllm.arch_name(base) in archs
        assert AutoConfig.for_model(f"kvtool_{base}").model_type == f"kvtool_{base}"


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_map_is_bit_identical_to_plain_vllm(fx, arch, tmp_path_factory):
    """An export whose every layer owns its KV runs exactly the base's vLLM model: same tokens, same bits."""
    base = standard_run(fx, arch, "base", tmp_path_factory)
    ident = standard_run(fx, arch, "identity", tmp_path_factory)
    assert ident["greedy"] == base["greedy"]
    assert ident["prompt_logprobs"] == base["prompt_logprobs"]
    assert ident["num_blocks"] == base["num_blocks"]


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_map_matches_kvtool_load(fx, arch, tmp_path_factory):
    """The shared export in vLLM is the model kvtool.load builds: same greedy tokens, log-probabilities within
    float32 rounding, on prompts longer than the sliding window of the Gemma configs."""
    run = standard_run(fx, arch, "shared", tmp_path_factory)
    want = fx["archs"][arch]
    assert [until_eos(g) for g in run["greedy"]] == [until_eos(g) for g in want["greedy"]]
    gap = max(abs(a - b) for ra, rb in zip(run["prompt_logprobs"], want["logprobs"], strict=True)
              for a, b in zip(ra, rb, strict=True))
    assert gap < 1e-4, gap
    base = standard_run(fx, arch, "base", tmp_path_factory)
    assert run["greedy"] != base["greedy"] or run["prompt_logprobs"] != base["prompt_logprobs"]  # really shared


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_healed_export_has_the_same_greedy_tokens_in_all_three_runtimes(fx, arch, tmp_path_factory):
    """A LoRA-healed export (adapters merged into the weights, owners' K/V changed too): vLLM's greedy tokens equal
    kvtool.load's and plain transformers' with the export's remote code, and healing changed the model."""
    want = fx["archs"][arch]["healed"]
    run = standard_run(fx, arch, "healed", tmp_path_factory)
    assert [until_eos(g) for g in run["greedy"]] == [until_eos(g) for g in want["greedy"]]
    assert [until_eos(g) for g in want["remote_code_greedy"]] == [until_eos(g) for g in want["greedy"]]
    gap = max(abs(a - b) for ra, rb in zip(run["prompt_logprobs"], want["logprobs"], strict=True)
              for a, b in zip(ra, rb, strict=True))
    assert gap < 1e-4, gap
    assert run["prompt_logprobs"] != standard_run(fx, arch, "shared", tmp_path_factory)["prompt_logprobs"]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_ratio_is_layers_over_owners(fx, arch, tmp_path_factory):
    """Consumers get no blocks: the KV memory is divided among the owners only."""
    base = standard_run(fx, arch, "base", tmp_path_factory)
    shared = standard_run(fx, arch, "shared", tmp_path_factory)
    want = fx["archs"][arch]
    layers, owners = want["layers"], want["owners"]
    if len(set(want["layer_types"])) == 1:  # one KV cache group: blocks = memory / (page x layers with a cache)
        page = 2 * shared["block_size"] * 2 * 32 * 4  # 2 KV heads of 32 dims, float32
        assert base["num_blocks"] == KV_MEMORY // (page * layers)
        assert shared["num_blocks"] == KV_MEMORY // (page * owners)
    else:  # sliding and full layers: vLLM groups them, and with these maps the ratio is exact
        assert shared["num_blocks"] * owners == base["num_blocks"] * layers
        assert shared["kv_tokens"] > base["kv_tokens"] * layers / owners * 0.99


def _check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtool_vllm", "check", str(path)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("arch", ARCHS)
def test_check_refuses_what_vllm_cannot_run(fx, arch):
    root = fx["root"] / arch
    assert _check(root / "shared").returncode == 0
    broken = {"per_tensor": "per-tensor plan", **fx["archs"][arch]["broken"]}
    for kind, words in broken.items():
        r = _check(root / kind)
        assert r.returncode == 2 and r.stdout == "", kind
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr, (kind, r.stderr)


@pytest.mark.parametrize(("arch", "kind", "words"), [
    ("llama", "per_tensor", "per-tensor plan"),
    ("llama", "owner_lacks_kv", "has no k_proj weight"),
    ("qwen3", "consumer_holds_kv", "k_norm"),
    ("phi3", "consumer_holds_kv", "should hold its queries only"),
    ("phi3", "owner_lacks_kv", "should hold its queries, keys and values"),
    ("gemma2", "wrong_type", "own attention type"),
])
def test_engine_refuses_in_one_line(fx, arch, kind, words, tmp_path):
    """The same refusals when vLLM itself loads the export (nothing checked beforehand)."""
    run = engine(fx["root"] / arch / kind, tmp_path)
    assert run["returncode"] == 2 and run["error_type"] == "KvtoolVllmError", run.get("error")
    assert words in run["error"] and "\n" not in run["error"]


def test_plain_vllm_refuses_an_export(fx, tmp_path):
    """Without the plugin, vLLM must not build the base class from a checkpoint that lacks the consumers' K/V."""
    run = engine(fx["root"] / "llama" / "shared", tmp_path, env={"VLLM_PLUGINS": ""})
    assert run["returncode"] == 2 and "greedy" not in run
    assert json.loads((fx["root"] / "llama" / "shared" / "config.json").read_text())["architectures"] == \
        ["KvtoolLlamaForCausalLM"]


def test_prompt_merging_is_said_once_not_dropped(fx, tmp_path):
    """A sidecar's prompt-KV merging has no vLLM form: the engine log says so, once."""
    exp = tmp_path / "merged"
    shutil.copytree(fx["root"] / "llama" / "shared", exp)
    side = json.loads((exp / "kvtool.json").read_text())
    side["plan"]["merge"] = {"method": "kvmerger", "budget": 0.5}
    (exp / "kvtool.json").write_text(json.dumps(side))
    run = engine(exp, tmp_path / "run", greedy={"prompts": fx["prompts"][:1], "max_tokens": 4})
    assert run["returncode"] == 0
    assert run["log"].count("records prompt-KV merging (kvmerger, budget 0.5)") == 1


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_tensor_parallel_2_equals_1(fx, arch, tmp_path_factory):
    """Two CPU workers (one core each) shard owners and query-only consumers alike and compute the same model."""
    one = standard_run(fx, arch, "shared", tmp_path_factory)
    two = engine(fx["root"] / arch / "shared", tmp_path_factory.mktemp(f"{arch}-tp2"), tensor_parallel_size=2,
                 env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, greedy={"prompts": fx["prompts"],
                                                               "max_tokens": fx["new_tokens"]},
                 prompt_logprobs=fx["logprob_ids"])
    assert two["returncode"] == 0, two.get("error")
    assert two["greedy"] == one["greedy"]
    gap = max(abs(a - b) for ra, rb in zip(two["prompt_logprobs"], one["prompt_logprobs"], strict=True)
              for a, b in zip(ra, rb, strict=True))
    assert gap < 1e-4, gap
    assert two["num_blocks"] == 2 * one["num_blocks"]  # each worker holds half the KV heads in the same memory
