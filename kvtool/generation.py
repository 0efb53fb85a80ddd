"""Text generation helpers: prompts rendered with the chat template, streamed or collected."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def render(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``, through the chat template when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def stream(model: str | None, prompt: str, *, max_new_tokens: int = 64, plan: str | Path | None = None,
           sample: bool = False, chat: bool = True, dtype: str | None = None, device: str | None = None,
           merge: dict | bool | None = None) -> str:
    """Load ``model`` (an export loads with sharing on, and its merging unless ``merge`` is False) and stream a
    continuation to stdout."""
    from transformers import TextStreamer

    from kvtool.loading import load

    m, tok = load(None if model in (None, "default") else model, plan=plan, dtype=dtype, device=device, merge=merge)
    ids = render(tok, prompt, chat).to(next(m.parameters()).device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sample else {"do_sample": False}
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tok.pad_token_id, **kw)
    sys.stdout.flush()
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
