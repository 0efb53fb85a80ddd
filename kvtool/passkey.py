"""Synthetic long-context retrieval: a pass key hidden at several depths in filler text, asked for at the end."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_FILLER = Path(__file__).with_name("assets") / "filler.txt"


@dataclass
class PasskeyCase:
    length: int
    depth: float
    key: str
    input_ids: torch.Tensor  # [1, T]


def build_cases(tokenizer, lengths=(512, 1024, 2048), depths=(0.1, 0.5, 0.9), seed: int = 0) -> list[PasskeyCase]:
    """One prompt per (length, depth); each exactly ``length`` tokens with the chat template applied."""
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
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        return list(ids) + tokenizer(" The pass key is", add_special_tokens=False)["input_ids"]
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


@torch.no_grad()
def passkey_accuracy(model, tokenizer, cases: list[PasskeyCase]) -> float:
    """Share of ``cases`` whose greedy answer (8 new tokens) starts with the right key."""
    hits = 0
    for c in cases:
        ids = c.input_ids.to(next(model.parameters()).device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += answer_ok(tokenizer.decode(out[0, ids.shape[1]:]), c.key)
    return hits / len(cases)


def answer_ok(text: str, key: str) -> bool:
    m = re.search(r"\d{5}", text)
    return m is not None and m.group(0) == key
