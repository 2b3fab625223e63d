"""Sentencepiece → transformers tokenizer: trained on the suite's wording, saved atomically, round-trips."""
from __future__ import annotations

import pytest

from tagi_ds.data.prompts import build_source
from tagi_ds.data.synthetic import all_wording, build_suite
from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer
from tagi_ds.errors import DataError


@pytest.fixture(scope="module")
def suite():
    return build_suite(instances_per_task=12, held_back_per_task=2)


@pytest.fixture(scope="module")
def corpus(suite):
    return all_wording(suite)


def test_llama_tokenizer_round_trips_through_from_pretrained(suite, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = train_sentencepiece_tokenizer(corpus, tmp_path / "tok", vocab_size=600, kind="llama")
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    task = suite.unseen_composition[0]
    src = build_source(task, task.instances[0])
    ids = tok(src)["input_ids"]
    assert ids[0] == tok.bos_token_id and again(src)["input_ids"] == ids
    # lossless: newlines and punctuation of the Tk-Instruct layout survive, nothing maps to <unk>
    assert tok.decode(ids, skip_special_tokens=True) == src
    assert tok.unk_token_id not in ids
    # every suite word is one piece (word-level in effect), so copying a word is copying one token
    for w in task.instances[0].input.split():
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert not list(tmp_path.glob(".tok*"))  # no temporary folder left behind


def test_text_outside_the_corpus_falls_back_to_bytes(corpus, tmp_path):
    tok = train_sentencepiece_tokenizer(corpus, tmp_path / "tok", vocab_size=600, kind="llama")
    text = "Zürich 42 ∑"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_t5_tokenizer_appends_eos_and_round_trips(corpus, tmp_path, model_type):
    from transformers import AutoTokenizer

    tok = train_sentencepiece_tokenizer(corpus, tmp_path / "t5", vocab_size=600, model_type=model_type, kind="t5",
                                        extra_ids=4)
    assert type(tok).__name__ == "T5Tokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("apple dog moon")["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "apple dog moon"
    assert "<extra_id_0>" in tok.get_vocab()
    assert AutoTokenizer.from_pretrained(tmp_path / "t5")("apple dog moon")["input_ids"] == ids


def test_republishing_replaces_the_folder(corpus, tmp_path):
    train_sentencepiece_tokenizer(corpus, tmp_path / "tok", vocab_size=600)
    (tmp_path / "tok" / "stale.txt").write_text("old")
    train_sentencepiece_tokenizer(corpus[:200], tmp_path / "tok", vocab_size=400)
    assert not (tmp_path / "tok" / "stale.txt").exists()


def test_bad_requests_raise_data_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="model_type='bpe'"):
        train_sentencepiece_tokenizer(corpus, tmp_path / "a", vocab_size=600, model_type="unigram", kind="llama")
    with pytest.raises(DataError, match="empty"):
        train_sentencepiece_tokenizer(["", "  "], tmp_path / "b", vocab_size=600)
    with pytest.raises(DataError, match="vocab_size=50"):
        train_sentencepiece_tokenizer(corpus, tmp_path / "c", vocab_size=50)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
