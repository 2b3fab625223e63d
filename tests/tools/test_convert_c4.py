"""`python tools/convert_c4.py SHARDS... OUT` as a user runs it: shards checked, indexed in name order, then
streamed by `TextCorpus(OUT)`; a bad line is refused as file:line."""
from __future__ import annotations

import gzip
import json

from tagi_ds.data.pretrain_text import INDEX_FILE, TextCorpus


def write_c4_shard(path, texts) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x.org/{i}"}) + "\n")


def _shards(tmp_path, n=3, docs=40):
    texts = [[f"shard {s} document {i}: some words here.\nSecond line." for i in range(docs)] for s in range(n)]
    paths = [tmp_path / "c4" / f"c4-train.{s:05d}-of-01024.json.gz" for s in range(n)]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for p, t in zip(paths, texts):
        write_c4_shard(p, t)
    return paths, texts


def test_index_then_stream(tmp_path, run):
    paths, texts = _shards(tmp_path)
    out = tmp_path / "corpus"
    done = run("tools/convert_c4.py", *map(str, [paths[2], paths[0], paths[1]]), str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "indexed 3 shard(s), 120 documents" in done.stdout
    index = json.loads((out / INDEX_FILE).read_text())
    assert [s["name"] for s in index["shards"]] == [p.name for p in paths]  # name order, whatever the argv order
    assert [s["documents"] for s in index["shards"]] == [40, 40, 40]

    corpus = TextCorpus(out)
    assert [t for _, t in corpus.iter()] == [t for shard in texts for t in shard]
    assert corpus.num_documents() == 120 and corpus.document(85) == texts[2][5]
    # a rank's share from a resume point: whole shards before it are skipped through the index
    assert [i for i, _ in corpus.iter(start=70, rank=1, world_size=4)] == list(range(73, 120, 4))

    # rerun: shards already indexed at the same size are not read again (even a same-size rewrite passes),
    # so a long indexing run resumes where it stopped
    paths[1].write_bytes(b"\0" * paths[1].stat().st_size)
    again = run("tools/convert_c4.py", *map(str, paths), str(out), "--no-progress")
    assert again.returncode == 0, again.stderr


def test_bad_shards_are_named_by_file_and_line(tmp_path, run):
    paths, _ = _shards(tmp_path, n=2, docs=5)
    with gzip.open(paths[1], "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "also"}) + "\n{broken\n")
    done = run("tools/convert_c4.py", *map(str, paths), str(tmp_path / "corpus"), "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{paths[1].name}:3: not valid JSON" in done.stderr

    with gzip.open(paths[1], "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"content": "no text key"}) + "\n")
    done = run("tools/convert_c4.py", str(paths[1]), str(tmp_path / "corpus"), "--no-progress")
    assert done.returncode == 2 and f"{paths[1].name}:1: expected an object with a string key 'text'" in done.stderr

    raw = paths[0].read_bytes()
    paths[0].write_bytes(raw[: len(raw) // 2])  # a download cut short
    done = run("tools/convert_c4.py", str(paths[0]), str(tmp_path / "corpus"), "--no-progress")
    assert done.returncode == 2 and paths[0].name in done.stderr and "truncated" in done.stderr

    done = run("tools/convert_c4.py", str(tmp_path / "missing.json.gz"), str(tmp_path / "corpus"))
    assert done.returncode == 2 and "missing.json.gz: C4 shard not found" in done.stderr
    done = run("tools/convert_c4.py", str(tmp_path / "corpus"))
    assert done.returncode == 2 and "at least one shard" in done.stderr
