"""Pretraining text: document readers, HINT's split, the offline corpus."""
from __future__ import annotations

import json
import random

import pytest

from tagi_ds.data.pretrain_text import hint_examples, hint_split, load_documents, offline_corpus
from tagi_ds.errors import DataError


@pytest.mark.parametrize("n", [3, 4, 10, 50, 128, 129, 1000])
@pytest.mark.parametrize("lengths", [(64, 32, 32), (5, 3, 2), (1, 1, 1)])
def test_hint_split_lengths_and_order(n, lengths):
    ids = list(range(n))
    rng = random.Random(n)
    for _ in range(50):
        a, b, c = hint_split(ids, lengths, rng)
        assert 1 <= len(a) <= lengths[0] and 1 <= len(b) <= lengths[1] and 1 <= len(c) <= lengths[2]
        # segments come from the document, in order; b and c are contiguous (c continues b)
        assert a == ids[a[0]:a[-1] + 1] and b == ids[b[0]:b[-1] + 1] and c == ids[c[0]:c[-1] + 1]
        assert a[-1] < b[0] and c[0] == b[-1] + 1


def test_hint_split_uses_the_whole_range_of_cut_points():
    ids = list(range(12))
    seen_a = {len(hint_split(ids, (12, 12, 12), random.Random(s))[0]) for s in range(300)}
    assert seen_a == set(range(1, 11))  # a can be 1..n-2 tokens long


def test_hint_split_rejects_short_input():
    with pytest.raises(ValueError, match="at least 3"):
        hint_split([1, 2], (4, 4, 4), random.Random(0))


def test_hint_examples_deterministic():
    docs = [list(range(k)) for k in (2, 10, 40)]
    assert hint_examples(docs, 20, (8, 4, 4), seed=1) == hint_examples(docs, 20, (8, 4, 4), seed=1)
    assert hint_examples(docs, 20, (8, 4, 4), seed=1) != hint_examples(docs, 20, (8, 4, 4), seed=2)
    with pytest.raises(DataError):
        hint_examples([[1], [2, 3]], 3)


def test_load_documents_text_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc line one\nline two\n\n\nsecond doc\n\nthird\n", encoding="utf-8")
    assert load_documents(txt) == ["first doc line one\nline two", "second doc", "third"]
    jl = tmp_path / "corpus.jsonl"
    jl.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "d e"}) + "\n", encoding="utf-8")
    assert load_documents(jl) == ["a b c", "d e"]
    jl.write_text(json.dumps({"text": "ok"}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus.jsonl:2"):
        load_documents(jl)
    jl.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="'text'"):
        load_documents(jl)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_documents(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        load_documents(tmp_path / "empty.txt")


def test_load_documents_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one doc", "", "two doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(tmp_path / "ds") == ["one doc", "two doc"]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(DataError, match="'text'"):
        load_documents(tmp_path / "ds2")


def test_offline_corpus():
    docs = offline_corpus(50, seed=3)
    assert len(docs) == 50 and docs == offline_corpus(50, seed=3) and docs != offline_corpus(50, seed=4)
    assert all(d and d[0].isupper() and d.endswith(".") for d in docs)
    assert len({d for d in docs}) == 50


def test_word_list_corpus_uses_only_the_suite_words_and_repeats_a_topic():
    from tagi_ds.data.pretrain_text import word_list_corpus
    from tagi_ds.data.synthetic import WORDS

    docs = word_list_corpus(40, seed=1)
    assert docs == word_list_corpus(40, seed=1) and docs != word_list_corpus(40, seed=2)
    for doc in docs:
        words = doc.replace(".", " ").split()
        assert set(words) <= set(WORDS)
        assert 5 <= len(set(words)) <= 8 < len(words)  # one topic of 5-8 words, said several times
