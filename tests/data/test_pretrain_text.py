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


# ------------------------------------------------------------------------------------------------- streaming
def _write(path, docs, fmt):
    """docs in one of the corpus formats: txt (blank-line separated), jsonl, json.gz (C4's shards)."""
    import gzip

    if fmt == "txt":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    else:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d, "url": "u", "timestamp": "t"}) + "\n" for d in docs)
    return path


FORMATS = {"txt": "corpus.txt", "jsonl": "corpus.jsonl", "json.gz": "c4-train.00000-of-01024.json.gz"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_iter_documents_formats(tmp_path, fmt):
    from tagi_ds.data.pretrain_text import iter_documents

    docs = [f"doc {i} ünï\nsecond line {i}" for i in range(30)]
    path = _write(tmp_path / FORMATS[fmt], docs, fmt)
    assert list(iter_documents(path)) == docs == load_documents(path)


def test_folder_of_shards_is_read_in_name_order(tmp_path):
    from tagi_ds.data.pretrain_text import TextCorpus, iter_documents

    (tmp_path / "c4").mkdir()
    _write(tmp_path / "c4" / "b.json.gz", ["b0", "b1"], "json.gz")
    _write(tmp_path / "c4" / "a.jsonl", ["a0"], "jsonl")
    _write(tmp_path / "c4" / "c.txt", ["c0", "c1 line\nmore"], "txt")
    (tmp_path / "c4" / "notes.md").write_text("not a shard")
    assert list(iter_documents(tmp_path / "c4")) == ["a0", "b0", "b1", "c0", "c1 line\nmore"]
    corpus = TextCorpus(tmp_path / "c4")
    assert corpus.num_documents() == 5 and corpus.document(3) == "c0"
    with pytest.raises(IndexError):
        corpus.document(5)


@pytest.mark.parametrize("indexed", [False, True])
def test_ranks_get_disjoint_shares_and_resume(tmp_path, indexed):
    from tagi_ds.data.pretrain_text import TextCorpus, convert_c4

    (tmp_path / "src").mkdir()
    docs = [f"document {i}" for i in range(53)]
    docs[7] = ""  # an empty text keeps its number but is never yielded
    for s, lo in enumerate(range(0, 53, 20)):
        _write(tmp_path / "src" / f"c4-train.{s:05d}-of-01024.json.gz", docs[lo:lo + 20], "json.gz")
    path = tmp_path / "src"
    if indexed:
        convert_c4(sorted(path.iterdir()), tmp_path / "idx", progress=False)
        path = tmp_path / "idx"
    corpus = TextCorpus(path)
    full = list(corpus.iter())
    assert [i for i, _ in full] == [i for i in range(53) if i != 7] and [t for _, t in full] == [d for d in docs if d]
    shares = [list(corpus.iter(rank=r, world_size=3)) for r in range(3)]
    assert sorted(x for s in shares for x in s) == full  # disjoint, nothing lost
    assert all(i % 3 == r for r, s in enumerate(shares) for i, _ in s)
    assert shares == [list(TextCorpus(path).iter(rank=r, world_size=3)) for r in range(3)]  # same every run
    for start in (0, 5, 20, 21, 52, 53, 80):  # resume from any document position, including shard boundaries
        assert list(corpus.iter(start=start, rank=1, world_size=2)) == [(i, t) for i, t in shares_of(full, 1, 2)
                                                                          if i >= start]
    assert corpus.document(40) == "document 40" and corpus.document(7) == ""
    with pytest.raises(ValueError, match="rank"):
        list(corpus.iter(rank=3, world_size=3))


def shares_of(full, rank, world):
    return [(i, t) for i, t in full if i % world == rank]


def test_index_must_match_its_shards(tmp_path):
    from tagi_ds.data.pretrain_text import TextCorpus, convert_c4

    shard = _write(tmp_path / "c4-train.00000-of-01024.json.gz", ["a", "b"], "json.gz")
    convert_c4([shard], tmp_path / "idx", progress=False)
    _write(shard, ["a", "b", "c"], "json.gz")
    with pytest.raises(DataError, match="missing or changed since it was indexed"):
        TextCorpus(tmp_path / "idx")
    # a rewrite that kept the size (faked in the index) but not the document count: caught while reading
    index = json.loads((tmp_path / "idx" / "corpus_index.json").read_text())
    index["shards"][0]["bytes"] = shard.stat().st_size
    (tmp_path / "idx" / "corpus_index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="3 documents, its index says 2"):
        list(TextCorpus(tmp_path / "idx").iter())
    shard.unlink()
    with pytest.raises(DataError, match="missing or changed"):
        TextCorpus(tmp_path / "idx")
    (tmp_path / "idx" / "corpus_index.json").write_text("{}")
    with pytest.raises(DataError, match="not a corpus index"):
        TextCorpus(tmp_path / "idx")


def test_gzip_and_utf8_errors_name_file_and_line(tmp_path):
    from tagi_ds.data.pretrain_text import iter_documents

    gz = _write(tmp_path / "x.json.gz", [f"doc {i} " * 50 for i in range(2000)], "json.gz")
    gz.write_bytes(gz.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"x\.json\.gz:\d+: cannot read past line \d+ .*truncated"):
        list(iter_documents(gz))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8"):
        list(iter_documents(bad))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_streaming_memory_does_not_grow_with_the_corpus(tmp_path, fmt):
    """tracemalloc peak while streaming 1k vs 20k documents (~0.5 MB vs ~10 MB): the same, far below the file."""
    import tracemalloc

    from tagi_ds.data.pretrain_text import TextCorpus

    def peak(n: int) -> tuple[int, int]:
        docs = [f"document {i} " + "word " * 100 for i in range(n)]
        path = _write(tmp_path / f"{n}-{FORMATS[fmt]}", docs, fmt)
        tracemalloc.start()
        count = sum(1 for _ in TextCorpus(path).iter(start=10, rank=0, world_size=2))
        got = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == (n - 10) // 2
        return got, sum(map(len, docs))

    (small, _), (big, text_bytes) = peak(1000), peak(20000)
    assert big < 1.5 * small + 32 * 1024, (small, big)
    assert big < 200 * 1024 < text_bytes / 10  # never the corpus, a line at a time
