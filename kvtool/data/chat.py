"""Chat-template rendering, once for every caller (prompts, chat-format calibration data, passkey prompts)."""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer, messages: list, where: str = "messages", generation_prompt: bool = False) -> str:
    """Chat ``messages`` as text: through the tokenizer's chat template, or ``role: content`` lines without one."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    try:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    except (TypeError, KeyError) as e:
        raise KvtoolError(f"{where}: messages must be a list of {{role, content}} objects") from e


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids [1, T] of a user ``prompt`` ready for generation: through the chat template (with the assistant
    turn opened) when the tokenizer has one and ``chat``, else the raw text."""
    if chat and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids
