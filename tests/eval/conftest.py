"""Fixtures for the evaluation tests (helpers live in eval_helpers.py)."""
from __future__ import annotations

import pytest
from eval_helpers import word_tokenizer


@pytest.fixture(scope="module")
def t5_tok():
    return word_tokenizer("t5")


@pytest.fixture(scope="module")
def llama_tok():
    return word_tokenizer("llama")
