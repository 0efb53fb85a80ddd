from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the kvtool cache)."""
    import kvtool

    return kvtool.load()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama with a tokenizer, loadable by path."""
    from kvtool.io.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", vocab_size=128)
