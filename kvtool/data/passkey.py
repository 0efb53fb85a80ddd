"""Synthetic long-context retrieval prompts: a pass key hidden at some depth in filler text, asked for at the end."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtool.data.chat import has_chat_template, prompt_ids

_FILLER = Path(__file__).with_name("assets") / "filler.txt"
PASSKEY_LENGTHS = (512, 1024, 2048)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
NEW_TOKENS = 8  # greedy tokens generated for the answer


def even_depths(n: int) -> tuple[float, ...]:
    """``n`` depths at the centres of equal slices of the prompt (10 gives 0.05, 0.15, …, 0.95)."""
    return tuple(round((i + 0.5) / n, 4) for i in range(n))


MERGE_PASSKEY_DEPTHS = even_depths(10)  # the merge task's finer grid


@dataclass
class PasskeyCase:
    length: int
    depth: float
    key: str
    input_ids: torch.Tensor  # [1, T]


def build_cases(tokenizer, lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS, seed: int = 0) -> list[PasskeyCase]:
    """One prompt per (length, depth); each at most ``length`` tokens with the chat template applied."""
    rng = random.Random(seed)
    filler = [s.strip() for s in _FILLER.read_text().splitlines() if s.strip()]
    cases = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = f" The pass key is {key}. Remember it. {key} is the pass key."
            question = " What is the pass key? Answer with the number only."
            cases.append(PasskeyCase(length, depth, key, _fit(tokenizer, filler, needle, question, length, depth,
                                                              rng)))
    return cases


def _wrap(tokenizer, text: str) -> list[int]:
    """The question as a user turn, and the answer's first words already in the assistant's mouth."""
    if has_chat_template(tokenizer):
        return prompt_ids(tokenizer, text)[0].tolist() + tokenizer(" The pass key is", add_special_tokens=False)[
            "input_ids"]
    return tokenizer(text + "\nThe pass key is")["input_ids"]


def _fit(tokenizer, filler, needle, question, length, depth, rng) -> torch.Tensor:
    """Add haystack sentences while the prompt stays within ``length`` tokens (it ends a sentence short of it)."""
    hay: list[str] = []
    pool: list[str] = []

    def prompt(sentences: list[str]) -> list[int]:
        pos = int(round(depth * len(sentences)))
        body = " ".join(sentences[:pos]) + needle + " " + " ".join(sentences[pos:])
        return _wrap(tokenizer, body.strip() + question)

    ids = prompt(hay)
    while True:
        if not pool:
            pool = list(filler)
            rng.shuffle(pool)
        nxt = prompt(hay + [pool[-1]])
        if len(nxt) > length:
            break
        hay.append(pool.pop())
        ids = nxt
    return torch.tensor([ids])


def answer_ok(text: str, key: str) -> bool:
    m = re.search(r"\d{5}", text)
    return m is not None and m.group(0) == key
