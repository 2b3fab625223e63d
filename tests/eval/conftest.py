"""Fixtures for the evaluation tests: word-level tokenizers (tests/tiny.py) and one finished micro run, built once
per session by the pipeline (tests/eval/eval_helpers.py)."""
from __future__ import annotations

import pytest
from tests.tiny import word_tokenizer


@pytest.fixture(scope="module")
def t5_tok():
    return word_tokenizer("t5")


@pytest.fixture(scope="module")
def llama_tok():
    return word_tokenizer("llama")


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    from tests.eval.eval_helpers import build_micro_run

    return build_micro_run(tmp_path_factory.mktemp("micro_eval"))
