"""Calibration and held-out text (the shipped default set, user files, Python's own pydoc topics), fixed-length token
chunks of it, and the prompt set ``kvtool eval`` generates from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtool.data.chat import render_messages
from kvtool.errors import KvtoolError

_PKG = Path(__file__).resolve().parents[1]  # the kvtool package
_ASSETS = Path(__file__).with_name("assets")


def default_data_path() -> Path:
    """The calibration set kvtool ships (inside the wheel, or at the repository root in a checkout)."""
    for p in (_PKG / "calibration_data", _PKG.parent / "calibration_data"):
        if p.is_dir():
            return p
    raise KvtoolError("kvtool's default calibration data is missing from this install; pass --data FILE")


def pydoc_texts(split: str) -> list[str]:
    """Python's own documentation topics (ships with CPython), split by topic: a quarter for calibration
    ("calib"), the rest held out for evaluation ("heldout"); the two never overlap."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if split == "calib":
        keys = keys[::4]
    elif split == "heldout":
        keys = [k for i, k in enumerate(keys) if i % 4]
    else:
        raise KvtoolError(f"unknown pydoc split {split!r}")
    return [topics[k].strip() for k in keys if topics[k].strip()]


def read_texts(path: str | Path, tokenizer=None) -> list[str]:
    """Read texts from a .txt (blank-line separated), a .jsonl ({"text"} or chat {"messages"}), or a directory.
    ``path`` may also be "default" (the shipped set) or "pydoc" (calibration quarter of Python's docs)."""
    if str(path) == "default":
        return read_texts(default_data_path(), tokenizer)
    if str(path) in ("pydoc", "pydoc:calib"):
        return pydoc_texts("calib")
    if str(path) == "pydoc:heldout":
        return pydoc_texts("heldout")
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        if not files:
            raise KvtoolError(f"{p} holds no .txt or .jsonl files")
        return [t for f in files for t in read_texts(f, tokenizer)]
    if not p.is_file():
        raise KvtoolError(f"data not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KvtoolError(f"{p} is not UTF-8 text") from e
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KvtoolError(f"{p}:{n}: not valid JSON ({e.msg})") from e
            except ValueError as e:  # an integer past Python's digit limit
                raise KvtoolError(f"{p}:{n}: not usable JSON ({str(e)[:80]})") from None
            except RecursionError:
                raise KvtoolError(f"{p}:{n}: nested too deeply to read") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                texts.append(obj["text"])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                if tokenizer is None:
                    raise KvtoolError(f"{p}:{n}: chat messages need a tokenizer to render")
                texts.append(render_messages(tokenizer, obj["messages"], f"{p}:{n}"))
            else:
                raise KvtoolError(f'{p}:{n}: expected {{"text": ...}} or {{"messages": [...]}}')
        return [t for t in texts if t.strip()]
    if p.suffix not in (".txt", ".md", ""):
        raise KvtoolError(f"{p}: unsupported data file type {p.suffix!r}; use .txt, .jsonl or a directory")
    return [para.strip() for para in raw.split("\n\n") if para.strip()]


@dataclass
class Chunks:
    """Fixed-length token windows with where they came from."""

    input_ids: torch.Tensor  # [N, T]
    source: str
    data_hash: str
    seed: int

    @property
    def num(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def token_stream(texts: list[str], tokenizer) -> list[int]:
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
    return list(ids)


def make_chunks(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int = 0, source: str = "") -> Chunks:
    """``samples`` non-overlapping windows of ``seq_len`` tokens, chosen deterministically by ``seed``.
    A BOS token leads each window when the tokenizer adds one by default."""
    if samples < 1 or seq_len < 2:
        raise KvtoolError("need at least 1 sample of at least 2 tokens")
    if not texts:
        raise KvtoolError(f"no text found in {source or 'the data'}")
    stream = token_stream(texts, tokenizer)
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    lead = [bos] if bos is not None and probe and probe[0] == bos else []
    body = seq_len - len(lead)
    windows = len(stream) // body
    if windows < samples:
        raise KvtoolError(f"{source or 'data'} is too short: {len(stream)} tokens give {windows} chunks of "
                          f"{seq_len} tokens, {samples} needed (pass more text, --samples or --seq-len)")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:samples].sort().values.tolist()
    rows = [lead + stream[w * body:(w + 1) * body] for w in pick]
    ids = torch.tensor(rows, dtype=torch.long)
    h = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return Chunks(ids, source, h, seed)


def load_chunks(data: str | Path | None, tokenizer, samples: int, seq_len: int, seed: int = 0) -> Chunks:
    data = data or "default"
    return make_chunks(read_texts(data, tokenizer), tokenizer, samples, seq_len, seed, source=str(data))


def heldout_chunks(tokenizer, samples: int = 8, seq_len: int = 256, data: str | Path | None = None) -> Chunks:
    """Held-out evaluation windows: the pydoc held-out split unless ``data`` is given (seed fixed at 1234)."""
    src = data or "pydoc:heldout"
    return make_chunks(read_texts(src, tokenizer), tokenizer, samples, seq_len, seed=1234, source=str(src))


def eval_prompts() -> list[str]:
    """The prompts ``kvtool eval`` generates from (written for kvtool)."""
    return json.loads((_ASSETS / "prompts.json").read_text())
