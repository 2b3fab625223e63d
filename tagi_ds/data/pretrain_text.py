"""Plain-text documents for stage-1 hypernetwork pretraining, streamed, and HINT's three-way split of a sequence.

HINT (Ivison et al., 2023) pretrains the hypernetwork on plain text: each sequence is cut at two random points;
segment a goes to the hypernetwork (as if it were an instruction), segment b to the backbone's input, and the
backbone must generate segment c. Each segment is capped by a length from the config; the caps keep b and c
contiguous (b keeps its last tokens, c its first), and a keeps its last tokens, closest to b.

A corpus (`TextCorpus`) is one file, a folder of shard files (sorted by name), a folder indexed by
`tools/convert_c4.py` (corpus_index.json: shard list + documents per shard), or a local `datasets` folder:
- `.txt` (any other suffix too): documents separated by blank lines; `.jsonl` / `.json`: one object per line with a
  string "text" (C4's layout); any of them may be gzipped (`.json.gz`, C4's shards).
- Documents are numbered 0, 1, … in file order (a jsonl line is a document even when its text is empty; empty
  ones are never yielded). `iter(start, rank, world_size)` streams documents i ≥ start with i % world_size == rank:
  every rank reads its own disjoint share, the same every run, and resumes from a document position. Lines of
  other ranks are counted, not parsed; with an index, whole shards before `start` are skipped unread.
Only one line (or one text document) is held at a time, never the corpus.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ..errors import DataError, TagiError
from ..io_utils import atomic_write_json

INDEX_FILE = "corpus_index.json"
INDEX_FORMAT = "tagi-ds text corpus index v1"
SHARD_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz")
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json")


# ------------------------------------------------------------------------------------------- streaming documents
def _is_jsonl(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json"))


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a plain or gzipped file, streamed; read errors name the file and line."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            for lineno, line in enumerate(fh, 1):
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut gzip stream an EOFError
        raise DataError(f"{path}:{lineno + 1}: cannot read past line {lineno} ({e}); is the file corrupt or "
                        f"truncated?") from None


def _utf8(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _slots(path: Path) -> Iterator[tuple[int, Union[bytes, str]]]:
    """One item per document, unparsed where that is cheap: (line, raw jsonl line) or (first line, text)."""
    if _is_jsonl(path):
        for lineno, line in _raw_lines(path):
            if line.strip():
                yield lineno, line
        return
    cur: list[str] = []
    first = 0
    for lineno, raw in _raw_lines(path):
        line = _utf8(path, lineno, raw).rstrip()
        if line.strip():
            first = first if cur else lineno
            cur.append(line)
        elif cur:
            yield first, "\n".join(cur)
            cur = []
    if cur:
        yield first, "\n".join(cur)


def _text(path: Path, lineno: int, payload: Union[bytes, str]) -> str:
    if isinstance(payload, str):
        return payload
    try:
        obj = json.loads(_utf8(path, lineno, payload))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{path}:{lineno}: expected an object with a string key 'text'")
    return obj["text"]


def _open_datasets(path: Path, split: str = "train"):
    """A local `datasets` folder: `save_to_disk` output, or anything `load_dataset(path)` reads; column `text`."""
    import datasets

    try:
        if any((path / m).is_file() for m in _DATASETS_MARKERS):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path), split=split)
    except Exception as e:  # many kinds; the user needs the path
        raise DataError(f"{path}: cannot read it as a local `datasets` dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: dataset has no split '{split}' (have: {', '.join(ds)})")
        ds = ds[split]
    if "text" not in ds.column_names:
        raise DataError(f"{path}: column 'text' is missing (have: {', '.join(ds.column_names)})")
    return ds


def _datasets_slots(ds, batch: int = 1024) -> Iterator[tuple[int, str]]:
    for lo in range(0, len(ds), batch):  # memory-mapped: one batch of rows in Python at a time
        for k, t in enumerate(ds[lo:lo + batch]["text"]):
            yield lo + k + 1, t if isinstance(t, str) else ""


def _read_index(folder: Path) -> tuple[list[Path], list[int]]:
    index = folder / INDEX_FILE
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        shards = meta["shards"]
        files = [Path(s["path"]) if Path(s["path"]).is_absolute() else folder / s["path"] for s in shards]
        counts = [int(s["documents"]) for s in shards]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{index}: not a corpus index written by tools/convert_c4.py ({e!r})") from None
    for f, s in zip(files, shards):
        if not f.is_file() or f.stat().st_size != s.get("bytes"):
            raise DataError(f"{index}: shard {f} is missing or changed since it was indexed (size "
                            f"{f.stat().st_size if f.is_file() else 'missing'}, indexed {s.get('bytes')}); "
                            f"rerun tools/convert_c4.py")
    return files, counts


class TextCorpus:
    """A pretraining corpus (see the module docstring), streamed document by document."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files: list[Path] = [self.path]
        self.counts: Optional[list[int]] = None  # documents per file, when an index gives them
        self._datasets = None
        if not self.path.exists():
            raise DataError(f"{self.path}: pretraining text not found")
        if self.path.is_dir():
            if (self.path / INDEX_FILE).is_file():
                self.files, self.counts = _read_index(self.path)
                return
            self.files = sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                                and p.name.lower().endswith(SHARD_SUFFIXES))
            if not self.files or any((self.path / m).is_file() for m in _DATASETS_MARKERS):
                self.files, self._datasets = [], _open_datasets(self.path)

    def _file_slots(self) -> Iterator[tuple[Path, Optional[int], Iterator[tuple[int, Union[bytes, str]]]]]:
        if self._datasets is not None:
            yield self.path, None, _datasets_slots(self._datasets)
            return
        for k, f in enumerate(self.files):
            yield f, None if self.counts is None else self.counts[k], _slots(f)

    def iter_slots(self, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, str]]:
        """(document index, text) for i >= start with i % world_size == rank, empty texts included."""
        if world_size < 1 or not 0 <= rank < world_size or start < 0:
            raise ValueError(f"need 0 <= rank < world_size and start >= 0, got rank={rank}, "
                             f"world_size={world_size}, start={start}")
        i = 0
        for f, count, slots in self._file_slots():
            if count is not None and i + count <= start:
                slots.close()
                i += count  # a whole indexed shard before the resume point: never opened
                continue
            first = i
            for lineno, payload in slots:
                if i >= start and i % world_size == rank:
                    yield i, _text(f, lineno, payload)
                i += 1
            if count is not None and i - first != count:  # numbering past this shard would shift silently
                raise DataError(f"{f}: {i - first} documents, its index says {count}; rerun tools/convert_c4.py")

    def iter(self, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, str]]:
        """(document index, text) of this rank's non-empty documents from `start` on."""
        for i, text in self.iter_slots(start, rank, world_size):
            if text.strip():
                yield i, text

    def document(self, i: int) -> str:
        """Document i ("" for an empty jsonl text); IndexError past the end."""
        for _, text in self.iter_slots(start=i):
            return text
        raise IndexError(f"{self.path}: document {i} is past the end of the corpus")

    def num_documents(self) -> int:
        """Document slots in the corpus: from the index when there is one, else one counting pass."""
        if self.counts is not None:
            return sum(self.counts)
        if self._datasets is not None:
            return len(self._datasets)
        return sum(1 for f in self.files for _ in _slots(f))


def iter_documents(path: str | Path, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """The non-empty documents of a corpus, streamed (see `TextCorpus.iter` for start / rank / world_size)."""
    for _, text in TextCorpus(path).iter(start, rank, world_size):
        yield text


def load_documents(path: str | Path) -> list[str]:
    """Every document of a corpus, in memory (small corpora; large ones should use `iter_documents`). A source
    with no documents is an error."""
    docs = list(iter_documents(path))
    if not docs:
        raise DataError(f"{path}: no documents found (empty text)")
    return docs


# -------------------------------------------------------------------------------------------------- C4 shards
def index_shard(path: Path) -> dict:
    """Check every line of a C4-style jsonl(.gz) shard (JSON object, string "text") and count its documents."""
    if not _is_jsonl(path):
        raise DataError(f"{path}: expected a .json.gz / .jsonl(.gz) shard with one JSON object per line")
    n = 0
    for lineno, payload in _slots(path):
        _text(path, lineno, payload)
        n += 1
    if n == 0:
        raise DataError(f"{path}: no documents")
    return {"path": str(path.resolve()), "name": path.name, "bytes": path.stat().st_size, "documents": n}


def convert_c4(sources: Sequence[str | Path], out: str | Path, progress: bool = True) -> dict:
    """Validate C4 shards and write OUT/corpus_index.json (shards sorted by name, documents per shard) so that
    `data.pretrain_text: OUT` streams them in place, deterministic and resumable. The index is rewritten after
    every shard and a shard already indexed at the same size is not read again, so a rerun resumes."""
    from tqdm.auto import tqdm

    files = sorted((Path(s) for s in sources), key=lambda p: p.name)
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: C4 shard not found")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"shards share a file name: {sorted({n for n in names if names.count(n) > 1})[:3]}")
    out = Path(out)
    index_path = out / INDEX_FILE
    done: dict[str, dict] = {}
    if index_path.is_file():
        try:
            done = {s["path"]: s for s in json.loads(index_path.read_text(encoding="utf-8"))["shards"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{index_path}: unreadable index from an earlier run ({e!r}); delete it") from None
    shards = []
    for f in tqdm(files, desc="C4 shards", unit="shard", disable=not progress):
        prior = done.get(str(f.resolve()))
        shards.append(prior if prior and prior.get("bytes") == f.stat().st_size else index_shard(f))
        atomic_write_json(index_path, {"format": INDEX_FORMAT, "documents": sum(s["documents"] for s in shards),
                                       "shards": shards})
    return {"format": INDEX_FORMAT, "documents": sum(s["documents"] for s in shards), "shards": shards}


def convert_c4_main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="convert_c4.py", description="Check C4 json.gz shards and index them for "
                                 "stage-1 pretraining (data.pretrain_text: OUT); the shards are read in place.")
    ap.add_argument("paths", nargs="+", metavar="SRC... OUT", help="C4 shards (c4-train.NNNNN-of-01024.json.gz), "
                    "then the output folder for corpus_index.json")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if len(args.paths) < 2:
        ap.error("give at least one shard and the output folder")
    try:
        index = convert_c4(args.paths[:-1], args.paths[-1], not args.no_progress)
    except TagiError as e:
        print(f"convert_c4: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"indexed {len(index['shards'])} shard(s), {index['documents']} documents: "
          f"{Path(args.paths[-1]) / INDEX_FILE}")
    return 0


# ------------------------------------------------------------------------------------------------ HINT split
def hint_split(ids: Sequence[int], lengths: Sequence[int] = (64, 32, 32),
               rng: Optional[random.Random] = None) -> tuple[list[int], list[int], list[int]]:
    """Cut `ids` at two random points into (a, b, c), each non-empty and capped at `lengths` = (la, lb, lc).

    A window of at most la + lb + lc tokens is taken at a random offset first, so long documents do not give
    almost-always-overlong segments; the cut points are uniform inside it. Needs at least 3 tokens.
    """
    la, lb, lc = (int(x) for x in lengths)
    if min(la, lb, lc) < 1:
        raise ValueError(f"segment lengths must be >= 1, got {tuple(lengths)}")
    n = len(ids)
    if n < 3:
        raise ValueError(f"hint_split needs at least 3 tokens, got {n}")
    rng = rng or random.Random(0)
    width = min(n, la + lb + lc)
    start = rng.randint(0, n - width)
    window = list(ids[start:start + width])
    cut1 = rng.randint(1, width - 2)          # a = window[:cut1], non-empty
    cut2 = rng.randint(cut1 + 1, width - 1)   # b = window[cut1:cut2], c = window[cut2:], both non-empty
    a, b, c = window[:cut1], window[cut1:cut2], window[cut2:]
    return a[-la:], b[-lb:], c[:lc]


def hint_examples(docs_ids: Sequence[Sequence[int]], n: int, lengths: Sequence[int] = (64, 32, 32),
                  seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """`n` HINT splits drawn from random documents (those with >= 3 tokens), deterministic in `seed`."""
    usable = [d for d in docs_ids if len(d) >= 3]
    if not usable:
        raise DataError("no pretraining document has 3 or more tokens")
    rng = random.Random(seed)
    return [hint_split(usable[rng.randrange(len(usable))], lengths, rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------- offline corpus
_NAMES = ["Ada", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena"]
_PLACES = ["the harbour", "a mountain village", "the library", "an old mill", "the market square", "a quiet farm",
           "the train station", "a river island", "the city museum", "a school garden"]
_THINGS = ["a red kite", "three apples", "a wooden box", "an old map", "a silver key", "two blue cups",
           "a heavy book", "a small lamp", "a paper boat", "a green scarf"]
_VERBS = ["found", "painted", "carried", "repaired", "sold", "borrowed", "hid", "counted", "cleaned", "lost"]
_TIMES = ["in the morning", "after lunch", "on Sunday", "before the storm", "at night", "in spring", "yesterday"]
_FEELINGS = ["happy", "tired", "curious", "proud", "worried", "calm", "surprised"]
_TEMPLATES = [
    "{n1} {v} {t} {time}.",
    "{n1} went to {p} with {n2}.",
    "At {p}, {n1} {v} {t}.",
    "{n2} was {f} because {n1} {v} {t}.",
    "{time}, {n1} and {n2} walked to {p}.",
    "Nobody knew why {n1} {v} {t} at {p}.",
    "{n1} felt {f} when {n2} arrived {time}.",
    "The story of {t} began at {p}.",
]


def offline_corpus(n_docs: int, seed: int = 0, sentences: tuple[int, int] = (3, 8)) -> list[str]:
    """`n_docs` short English-like documents from templates: no download, deterministic in `seed`.

    Used for the tiny run's stage-1 pretraining when `data.pretrain_text` is None; it has enough repeated
    structure for a tiny model to learn continuation, which is all the offline demo needs.
    """
    rng = random.Random(f"offline_corpus:{seed}")
    docs = []
    for _ in range(n_docs):
        k = rng.randint(*sentences)
        doc = []
        for _ in range(k):
            n1, n2 = rng.sample(_NAMES, 2)
            doc.append(rng.choice(_TEMPLATES).format(n1=n1, n2=n2, p=rng.choice(_PLACES), t=rng.choice(_THINGS),
                                                     v=rng.choice(_VERBS), time=rng.choice(_TIMES),
                                                     f=rng.choice(_FEELINGS)))
        docs.append(" ".join(s[0].upper() + s[1:] for s in doc))
    return docs


def word_list_corpus(n_docs: int, seed: int = 0, lines: tuple[int, int] = (6, 10)) -> list[str]:
    """`n_docs` documents made of the offline suite's words: each draws a "topic" of 5-8 words and writes lines of
    3-6 of them. A later segment's words are predictable from an earlier segment's topic, so stage 1 teaches the
    hypernetwork to carry its input's content into the adapter, in the only words the tiny backbone's tokenizer
    and copy pretraining know (the stories above are out of its vocabulary: CE stayed ~6 and the adapters it
    learned to write only had to be undone by the finetune)."""
    from .synthetic import WORDS  # the suite's shared word list (one sentencepiece each)

    rng = random.Random(f"word_list_corpus:{seed}")
    docs = []
    for _ in range(n_docs):
        topic = rng.sample(WORDS, rng.randint(5, 8))
        docs.append(" ".join(" ".join(rng.sample(topic, rng.randint(3, min(6, len(topic))))) + "."
                             for _ in range(rng.randint(*lines))))
    return docs


OFFLINE_CORPORA = {"stories": offline_corpus, "suite_words": word_list_corpus}

