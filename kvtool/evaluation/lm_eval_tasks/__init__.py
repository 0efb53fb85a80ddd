"""lm-evaluation-harness tasks kvtool ships, on data it writes at run time (nothing is downloaded).

The YAMLs beside this module are templates: ``write_tasks`` writes each task's JSONL into a directory and the YAMLs,
pointed at it, beside them; that directory is the harness's ``include_path``.

- ``kvtool_pydoc_ppl``: rolling log-likelihood perplexity over Python's held-out documentation topics (ships with
  CPython; the split ``kvtool eval --tasks ppl`` reads).
- ``kvtool_passkey``: the pass key prompts of ``kvtool.data.passkey`` (kvtool's own filler text), greedy answer.
- ``kvtool_pydoc_next``: pick the sentence that follows a sentence of those topics among four.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from kvtool.data.passkey import NEW_TOKENS, build_cases
from kvtool.data.texts import pydoc_texts

TASKS = ("kvtool_pydoc_ppl", "kvtool_passkey", "kvtool_pydoc_next")
_HERE = Path(__file__).resolve().parent
PPL_DOC_CHARS = 4000  # each topic is cut (at a paragraph end) to about this many characters
NEXT_ITEMS = 100
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def write_tasks(out: str | Path, tokenizer, *, passkey_lengths: Sequence[int], passkey_depths: Sequence[float],
                max_length: int) -> Path:
    """Write the data of every shipped task and its YAML into ``out``; returns ``out`` (the harness include path).
    Pass key prompts longer than ``max_length`` minus the answer's tokens are shortened to fit."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fit = max(32, max_length - 2 * NEW_TOKENS)
    lengths = sorted({min(int(n), fit) for n in passkey_lengths})
    data = {
        "kvtool_pydoc_ppl": [{"text": t} for t in ppl_docs(pydoc_texts("heldout"))],
        "kvtool_passkey": passkey_docs(tokenizer, lengths, passkey_depths),
        "kvtool_pydoc_next": next_sentence_docs(pydoc_texts("heldout")),
    }
    for name, rows in data.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
        template = (_HERE / f"{name}.yaml").read_text(encoding="utf-8")
        (out / f"{name}.yaml").write_text(template.replace("@DATA_DIR@", out.as_posix()), encoding="utf-8")
    return out


def ppl_docs(texts: list[str], chars: int = PPL_DOC_CHARS) -> list[str]:
    """Each text cut at the last paragraph end within ``chars`` characters (whole when shorter)."""
    docs = []
    for t in texts:
        if len(t) > chars:
            cut = t.rfind("\n\n", 0, chars)
            t = t[:cut if cut > chars // 4 else chars].rstrip()
        docs.append(t)
    return docs


def passkey_docs(tokenizer, lengths: Sequence[int], depths: Sequence[float]) -> list[dict]:
    """kvtool's pass key prompts (chat template applied when the tokenizer has one) as text, with their keys."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    rows = []
    for c in build_cases(tokenizer, tuple(lengths), tuple(depths)):
        ids = c.input_ids[0].tolist()
        if adds_bos and ids[:1] == [bos]:  # the harness's tokenizer call adds it again
            ids = ids[1:]
        rows.append({"prompt": tokenizer.decode(ids), "key": c.key, "length": c.length, "depth": c.depth})
    return rows


def _sentences(text: str) -> list[list[str]]:
    """The prose paragraphs of a documentation topic (not indented, no headings or lists), split into sentences."""
    paras = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(ln[:1].isspace() or ln.lstrip()[:1] in "*-=+>|" for ln in lines):
            continue
        paras.append(_SENTENCE_END.split(" ".join(ln.strip() for ln in lines)))
    return paras


def _usable(s: str) -> bool:
    return 30 <= len(s) <= 240 and s[0].isupper() and s.endswith(".")


def next_sentence_docs(texts: list[str], items: int = NEXT_ITEMS, choices: int = 4, seed: int = 0) -> list[dict]:
    """``items`` (sentence, next sentence) pairs from the prose of ``texts``; each offers the true next sentence and
    ``choices - 1`` sentences of other texts, in a seeded random order."""
    rng = random.Random(seed)
    pairs: list[tuple[int, str, str]] = []
    pool: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        for para in _sentences(text):
            pool += [(i, s) for s in para if _usable(s)]
            pairs += [(i, a, b) for a, b in zip(para, para[1:], strict=False) if _usable(a) and _usable(b)]
    rng.shuffle(pairs)
    rows = []
    for i, context, answer in pairs[:items]:
        others = [s for j, s in pool if j != i and s != answer]
        opts = rng.sample(others, choices - 1)
        label = rng.randrange(choices)
        opts.insert(label, answer)
        rows.append({"context": context, "choices": opts, "label": label})
    return rows
