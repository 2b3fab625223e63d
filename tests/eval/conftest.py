"""Fixtures for the evaluation tests: word-level tokenizers (tests/tiny.py)."""
from __future__ import annotations

import pytest
from tests.tiny import word_tokenizer


@pytest.fixture(scope="module")
def t5_tok():
    return word_tokenizer("t5")


@pytest.fixture(scope="module")
def llama_tok():
    return word_tokenizer("llama")
