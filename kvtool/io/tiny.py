"""Tiny random models of every supported architecture, for tests and examples (no network, no weights)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from kvtool.data.texts import default_data_path

TINY_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(arch: str, **overrides):
    """A small config of ``arch`` (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)."""
    kw = dict(TINY_COMMON)
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch in ("gemma2", "gemma3_text"):
        kw.update(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
        kw["layer_types"] = ["sliding_attention" if (i + 1) % 3 else "full_attention"
                             for i in range(overrides.get("num_hidden_layers", kw["num_hidden_layers"]))]
    if arch == "qwen3":
        kw["head_dim"] = 16
    if arch == "phi3":
        kw.update(sliding_window=None)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str | None = None, **overrides):
    if attn_implementation is None:  # Gemma2 (softcapping) runs eager only
        attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def tiny_tokenizer(vocab_size: int = 128):
    """A small BPE tokenizer trained in milliseconds on the shipped calibration text (for offline tests)."""
    text = (default_data_path() / "default.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random model and its tokenizer to ``path`` (a loadable HF directory)."""
    model = tiny_model(arch, seed=seed, **overrides)
    tok = tiny_tokenizer(model.config.vocab_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
