"""Task-grouped batches for the hypernetwork: k tasks x <= m instances per batch, sharded over ranks.

Grouping by task matters because the student encodes each task's instruction once per batch and applies one
generated adapter per task; a batch of k tasks is k adapters, not one per instance.

Every rank builds the same global batch list from (seed, epoch) and takes every world_size-th batch, so shards are
disjoint and together cover every instance exactly once per epoch. ZeRO-3 needs every rank to run the same number
of steps (each step gathers parameters collectively), so when the batch count does not divide by world_size the
short ranks are padded by repeating batches from the start of the global list: those instances are then seen twice
that epoch (`num_padded` says how many batches). `drop_last=True` drops the uneven tail instead.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

from ..errors import DataError

Batch = list[tuple[int, int]]  # (task_idx, instance_idx) pairs


def _chunks(task_sizes: Sequence[int], m: int, rng: random.Random) -> list[tuple[int, list[int]]]:
    """Each task's instances shuffled and cut into groups of <= m; all groups shuffled together."""
    out = []
    for t, size in enumerate(task_sizes):
        idx = list(range(size))
        rng.shuffle(idx)
        out += [(t, idx[i:i + m]) for i in range(0, size, m)]
    rng.shuffle(out)
    return out


def _assemble(chunks: list[tuple[int, list[int]]], k: int) -> list[Batch]:
    """Fill batches with up to k chunks of distinct tasks, in chunk order; a chunk whose task is already in the
    batch waits for a later batch (the first later chunk of a new task is pulled forward instead)."""
    pending = list(chunks)
    batches: list[Batch] = []
    while pending:
        batch_tasks: set[int] = set()
        batch: Batch = []
        rest = []
        for j, (t, inst) in enumerate(pending):
            if len(batch_tasks) == k:
                rest.extend(pending[j:])
                break
            if t in batch_tasks:
                rest.append((t, inst))
                continue
            batch_tasks.add(t)
            batch += [(t, i) for i in inst]
        pending = rest
        batches.append(batch)
    return batches


class TaskGroupedSampler:
    """Batch sampler yielding lists of (task_idx, instance_idx); usable as a DataLoader `batch_sampler`."""

    def __init__(self, task_sizes: Sequence[int], tasks_per_batch: int, instances_per_task: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = False) -> None:
        if tasks_per_batch < 1 or instances_per_task < 1:
            raise ValueError("tasks_per_batch and instances_per_task must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if any(s < 0 for s in task_sizes):
            raise ValueError("task sizes must be >= 0")
        self.task_sizes = list(task_sizes)
        self.k, self.m = tasks_per_batch, instances_per_task
        self.rank, self.world_size = rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0
        self._cache: tuple[int, list[Batch]] | None = None  # (epoch, batches): len() must not redo the shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[Batch]:
        """All batches of this epoch, identical on every rank."""
        if self._cache is None or self._cache[0] != self.epoch:
            rng = random.Random(f"task_grouped:{self.seed}:{self.epoch}")
            self._cache = (self.epoch, _assemble(_chunks(self.task_sizes, self.m, rng), self.k))
        return self._cache[1]

    def _layout(self) -> tuple[int, int]:
        """(global batches, batches per rank) for this epoch."""
        n = len(self.global_batches())
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        return n, per_rank

    @property
    def num_padded(self) -> int:
        """Repeated batches added over all ranks this epoch (0 when the count divides or drop_last)."""
        n, per_rank = self._layout()
        return max(per_rank * self.world_size - n, 0)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.global_batches()
        n = len(batches)
        if n == 0:
            return
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        for step in range(per_rank):
            # Global position rank + step * world_size; past the end it wraps to the start (padding).
            yield list(batches[(self.rank + step * self.world_size) % n])

    def __len__(self) -> int:
        return self._layout()[1]


class EpochPositions:
    """A GLOBAL micro-batch position → its batch keys, as a pure function of (seed, position). Rank r of W takes
    positions r, r + W, r + 2W, ... in its local steps, so a position is a property of the data, not of the world
    size: a resumed run (on any number of ranks) continues with exactly the batches the uninterrupted run would see,
    and every rank runs the same number of steps (ZeRO-3) without padding.

    Epochs may hold different numbers of batches (the task-grouped sampler packs leftovers differently each epoch),
    so positions are walked epoch by epoch from the start (the last epoch found is cached), never divided by one
    epoch's length."""

    def __init__(self, sampler: TaskGroupedSampler) -> None:
        self.sampler = sampler
        self._epoch, self._first = 0, 0  # the epoch holding the last position asked for, and its first position

    def keys(self, position: int) -> Batch:
        epoch, first = (self._epoch, self._first) if position >= self._first else (0, 0)
        while True:
            self.sampler.set_epoch(epoch)
            n = len(self.sampler.global_batches())
            if n == 0:
                raise DataError("the training data gives no batch (no tasks or no instances)")
            if position < first + n:
                break
            epoch, first = epoch + 1, first + n
        self._epoch, self._first = epoch, first
        return list(self.sampler.global_batches()[position - first])
