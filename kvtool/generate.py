"""``kvtool generate``: a continuation of one prompt from a (shared) model, handed out piece by piece as it is made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TextStreamer

from kvtool.data.chat import prompt_ids
from kvtool.io.devices import model_device
from kvtool.io.loading import load


class _CallbackStreamer(TextStreamer):
    """transformers' streamer, handing finished text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text + ("\n" if stream_end else ""))


def generate(model: str | None, prompt: str, *, max_new_tokens: int = 64, plan: str | Path | None = None,
             sample: bool = False, chat: bool = True, dtype: str | None = None, device: str | None = None,
             merge: dict | bool | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """Load ``model`` (an export loads with sharing on, and its merging unless ``merge`` is False) and continue
    ``prompt`` (through the chat template when ``chat``); ``on_text`` receives the text as it is decoded. Returns the
    whole continuation."""
    m, tok = load(None if model in (None, "default") else model, plan=plan, dtype=dtype, device=device, merge=merge)
    ids = prompt_ids(tok, prompt, chat).to(model_device(m))
    streamer = _CallbackStreamer(tok, on_text) if on_text is not None else None
    kw = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sample else {"do_sample": False}
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
