"""Stage 1's data: blocks of documents by GLOBAL position, streamed, so memory is O(one micro batch) and a run resumes
on any world size.

Global micro batch g holds the document slots [g * size, (g + 1) * size) of the corpus, wrapping around at its end
(the next epoch); rank r of W takes global batches r, r + W, r + 2W, ... in its local steps. A position is therefore
a property of the data, not of the world size: a run checkpointed at global position G on 2 ranks continues at G on
1 or 4. Each rank reads the corpus once, sequentially, and skips the other ranks' blocks without keeping them.

Slots are the corpus's document numbers (`TextCorpus.iter_slots`: empty documents count, they are dropped from a
block, never replaced by another document, so every run sees the same documents at the same positions).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

from ..errors import DataError
from .pretrain_text import TextCorpus


class ListCorpus:
    """An in-memory corpus (the offline demo's generated stories) behind TextCorpus's `iter_slots`."""

    def __init__(self, docs: Sequence[str], name: str = "offline corpus"):
        self.docs, self.path = list(docs), name

    def iter_slots(self, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, str]]:
        for i in range(start, len(self.docs)):
            if i % world_size == rank:
                yield i, self.docs[i]


Corpus = Union[TextCorpus, ListCorpus]


class DocumentBlocks:
    """Blocks of `size` document slots by global index; `block(g)` must be asked in increasing g (one rank's
    sequence), any start (a resume). Holds one open reader and at most one block of text."""

    def __init__(self, corpus: Corpus, size: int):
        if size < 1:
            raise ValueError(f"block size must be >= 1, got {size}")
        self.corpus, self.size = corpus, size
        self.length: Optional[int] = None  # slots in the corpus, learned when a reader first runs past the end
        self._reader: Optional[Iterator[tuple[int, str]]] = None
        self._next = 0  # the slot the open reader yields next (within the corpus, i.e. modulo length)

    def _open(self, slot: int) -> None:
        self._reader, self._next = self.corpus.iter_slots(start=slot), slot

    def _read(self, slot: int) -> str:
        """The text at corpus slot `slot` (0 <= slot < length), reading forward from the open reader."""
        if self._reader is None or slot < self._next:
            self._open(slot)
        for i, text in self._reader:
            self._next = i + 1
            if i == slot:
                return text
        # the reader ran out: the corpus has `self._next` slots
        if self._next == 0 or (self.length is not None and self.length == 0):
            raise DataError(f"{self.corpus.path}: no documents")
        self.length = self._next
        self._reader = None
        return self._read(slot % self.length)

    def block(self, g: int) -> list[tuple[int, str]]:
        """(global slot, text) of global block g; the slot counts across epochs (slot // length is the epoch)."""
        out = []
        for s in range(g * self.size, (g + 1) * self.size):
            local = s if self.length is None else s % self.length
            text = self._read(local)
            out.append((s, text))
        return out
