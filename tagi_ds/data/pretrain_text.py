"""Plain-text documents for stage-1 hypernetwork pretraining, and HINT's three-way split of a token sequence.

HINT (Ivison et al., 2023) pretrains the hypernetwork on plain text: each sequence is cut at two random points;
segment a goes to the hypernetwork (as if it were an instruction), segment b to the backbone's input, and the
backbone must generate segment c. Each segment is capped by a length from the config; the caps keep b and c
contiguous (b keeps its last tokens, c its first), and a keeps its last tokens, closest to b.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from .jsonl import iter_jsonl_objects, read_utf8


# ------------------------------------------------------------------------------------------------- documents
def documents_from_text(text: str) -> list[str]:
    """Blank-line separated documents; lines inside a document are joined with a newline."""
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def documents_from_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, row in iter_jsonl_objects(path, "an object with a string key 'text'"):
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string key 'text'")
        if row["text"].strip():
            docs.append(row["text"])
    return docs


def documents_from_datasets(path: Path, split: str = "train") -> list[str]:
    """A local `datasets` folder: `save_to_disk` output, or anything `load_dataset(path)` reads; column `text`."""
    import datasets

    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
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
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def load_documents(path: str | Path) -> list[str]:
    """Documents from a plain text file (blank-line separated), a .jsonl/.json file with `text`, or a folder
    `datasets` can read. A source with no documents is an error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: pretraining text not found")
    if path.is_dir():
        docs = documents_from_datasets(path)
    elif path.suffix in (".jsonl", ".json"):
        docs = documents_from_jsonl(path)
    else:
        docs = documents_from_text(read_utf8(path))
    if not docs:
        raise DataError(f"{path}: no documents found (empty text)")
    return docs


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

