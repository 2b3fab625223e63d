"""Fixtures for tests/data: small real tokenizers built offline (tests/tiny.py), never from a hub."""
from __future__ import annotations

import pytest

from tests.tiny import bpe_tokenizer


@pytest.fixture(scope="session")
def t5_tokenizer():
    """T5-like: `text </s>` on encode, a pad token."""
    return bpe_tokenizer("t5")


@pytest.fixture(scope="session")
def llama_tokenizer():
    """LLaMA-like: `<s> text` on encode, no pad token (padding falls back to eos)."""
    return bpe_tokenizer("llama")
