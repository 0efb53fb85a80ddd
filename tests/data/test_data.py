from __future__ import annotations

import json

import pytest
import torch

from kvtool.data.texts import heldout_chunks, load_chunks, make_chunks, pydoc_texts, read_texts
from kvtool.errors import KvtoolError
from kvtool.io.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_default_set_is_large_and_varied():
    texts = read_texts("default")
    assert len(texts) >= 40
    assert any("def " in t for t in texts) and any('"' in t for t in texts)


def test_txt_jsonl_chat_and_directory(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\n")
    rows = [{"text": "plain text row"}, {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_texts(tmp_path / "a.txt") == ["first paragraph\nstill first", "second paragraph"]
    b = read_texts(tmp_path / "b.jsonl", tok)
    assert b[0] == "plain text row" and "hi" in b[1] and "hello" in b[1]
    assert len(read_texts(tmp_path, tok)) == 4


def test_bad_inputs_are_clear_errors(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(KvtoolError, match="bad.jsonl:1"):
        read_texts(tmp_path / "bad.jsonl", tok)
    with pytest.raises(KvtoolError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(KvtoolError, match="no text"):
        load_chunks(tmp_path / "empty.txt", tok, 4, 16)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(KvtoolError, match="too short"):
        load_chunks(tmp_path / "short.txt", tok, 4, 16)


def test_chunks_are_deterministic_and_fixed_length(tok):
    a = load_chunks(None, tok, 16, 32, seed=3)
    b = load_chunks(None, tok, 16, 32, seed=3)
    c = load_chunks(None, tok, 16, 32, seed=4)
    assert a.input_ids.shape == (16, 32)
    assert torch.equal(a.input_ids, b.input_ids) and a.data_hash == b.data_hash
    assert not torch.equal(a.input_ids, c.input_ids)
    # chunks are distinct windows of the stream
    assert len({tuple(r.tolist()) for r in a.input_ids}) == 16


def test_pydoc_splits_are_disjoint(tok):
    calib, held = set(pydoc_texts("calib")), set(pydoc_texts("heldout"))
    assert calib and held and not calib & held
    h = heldout_chunks(tok, samples=4, seq_len=64)
    assert h.input_ids.shape == (4, 64)


def test_bos_leads_each_chunk_when_tokenizer_adds_it():
    class Wrap:  # a tokenizer that prepends BOS like Llama-2's
        def __init__(self, t):
            self.t, self.bos_token_id, self.eos_token = t, t.bos_token_id, t.eos_token

        def __call__(self, text, add_special_tokens=True):
            ids = self.t(text)["input_ids"]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    w = Wrap(tiny_tokenizer())
    ch = make_chunks(read_texts("default"), w, 4, 16)
    assert (ch.input_ids[:, 0] == w.bos_token_id).all()
