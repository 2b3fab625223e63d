"""Teacher signal: what the teacher says at a batch's label positions, whatever its source, behind one Protocol.

A `TeacherSignal` turns (task of each row, instance ids, label lengths) into one teacher-batch object:
  TopKTeacher      top-k log-probs and ids (cache mode "topk")
  SampledTeacher   distinct ids drawn from the teacher, their counts of N draws and log-probs (mode "sampled")
  PriorityTeacher  priority-sampled ids, their log-probs and the threshold log tau (mode "priority")
  DenseTeacher     the teacher's full logits (an online teacher computed live; `DenseTeacher.of`)
and `losses.teacher_kl` / `losses.signal_kl` dispatch on its type to the matching pure loss. Every tensor is padded to
(N, L, ...) with L = max(label lengths); `valid` (N, L) says which positions are real (DistillKit's idea: losses never
care where the teacher came from).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from ..errors import ArtifactMismatchError
from .logit_cache import CacheShardReader
from .sampled_kl import count_weights, distinct_weights, priority_weights
from .teacher_rows import CacheMode

Expect = Union[Mapping[str, Any], Callable[[str], Mapping[str, Any]]]


class _Batch:
    def to(self, device: torch.device | str):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[attr-defined]


@dataclass
class TopKTeacher(_Batch):
    logprobs: torch.Tensor  # (N, L, k) float32, log p at T, padded with 0
    ids: torch.Tensor  # (N, L, k) int64
    valid: torch.Tensor  # (N, L) bool


@dataclass
class SampledTeacher(_Batch):
    logprobs: torch.Tensor  # (N, L, n) float32 log p at T of each distinct drawn id (0 on padding)
    ids: torch.Tensor  # (N, L, n) int64
    counts: torch.Tensor  # (N, L, n) int64, draws of each id (0 = padding); sums to num_samples on valid rows
    valid: torch.Tensor  # (N, L) bool
    num_samples: int = 1

    def weights(self, estimator: str = "distinct") -> torch.Tensor:
        """(N, L, n) unbiased estimate of p at each slot: "counts" = count / N, "distinct" = Horvitz-Thompson."""
        if estimator == "counts":
            return count_weights(self.counts, self.num_samples)
        if estimator == "distinct":
            return distinct_weights(self.logprobs, self.counts, self.num_samples)
        raise ValueError(f"sampled estimator must be 'counts' or 'distinct', got {estimator!r}")


@dataclass
class PriorityTeacher(_Batch):
    logprobs: torch.Tensor  # (N, L, k) float32
    ids: torch.Tensor  # (N, L, k) int64
    log_threshold: torch.Tensor  # (N, L, 1) float32, log tau (-inf when k covers the vocabulary)
    valid: torch.Tensor  # (N, L) bool

    def weights(self) -> torch.Tensor:
        """(N, L, k) w = max(p, tau): exact for the head (p >= tau), tau for a sampled tail id."""
        return priority_weights(self.logprobs, self.log_threshold)


@dataclass
class DenseTeacher(_Batch):
    logits: torch.Tensor  # (N, L, V) teacher logits (at temperature 1) at the label positions
    valid: torch.Tensor  # (N, L) bool

    @staticmethod
    def of(logits: torch.Tensor, valid: torch.Tensor) -> "DenseTeacher":
        if logits.shape[:2] != valid.shape:
            raise ArtifactMismatchError(f"online teacher: label positions {tuple(logits.shape[:2])} differ from the "
                                        f"batch's {tuple(valid.shape)}")
        return DenseTeacher(logits, valid.bool())


TeacherBatch = Union[TopKTeacher, SampledTeacher, PriorityTeacher, DenseTeacher]


@runtime_checkable
class TeacherSignal(Protocol):
    def batch(self, task_names: Sequence[str], instance_ids: Sequence[str],
              label_lengths: Sequence[int]) -> TeacherBatch:
        """The teacher at the first label_lengths[i] label positions of row i (task task_names[i])."""
        ...


def stack_rows(mode: CacheMode, rows: Sequence[Optional[Mapping[str, torch.Tensor]]],
               lengths: Sequence[int]) -> TeacherBatch:
    """Per-row stored arrays (`CacheShardReader.rows`, each (>= len, columns)) -> one padded teacher batch."""
    n, L, w = len(rows), max([0, *map(int, lengths)]), mode.width
    pads = {"logprobs": (w, torch.float32), "ids": (w, torch.long), "counts": (w, torch.long),
            "threshold": (1, torch.float32)}
    names = {"topk": ("logprobs", "ids"), "sampled": ("logprobs", "ids", "counts"),
             "priority": ("logprobs", "ids", "threshold")}[mode.name]
    out = {k: torch.zeros(n, L, pads[k][0], dtype=pads[k][1]) for k in names}
    valid = torch.zeros(n, L, dtype=torch.bool)
    for i, (r, want) in enumerate(zip(rows, lengths)):
        if r is None or want == 0:
            continue
        for k in names:
            out[k][i, :want] = r[k][:want]
        valid[i, :want] = True
    if mode.name == "topk":
        return TopKTeacher(out["logprobs"], out["ids"], valid)
    if mode.name == "sampled":
        return SampledTeacher(out["logprobs"], out["ids"], out["counts"], valid, num_samples=mode.width)
    return PriorityTeacher(out["logprobs"], out["ids"], out["threshold"], valid)


class CachedTeacherSignal:
    """Reads `<cache_root>/<task>/` shards, opened (and checksummed) lazily the first time a task is asked for.

    `expect` is a dict of manifest fields every shard must match, or a function task -> dict (e.g. to include the
    per-task teacher adapter hash). One batch may mix tasks; their shards must share one mode and width.
    """

    def __init__(self, cache_root: str | os.PathLike, expect: Expect | None = None, verify: bool = True):
        self.root = Path(cache_root)
        self.expect = expect
        self.verify = verify
        self._shards: dict[str, CacheShardReader] = {}

    def shard(self, task_name: str) -> CacheShardReader:
        if task_name not in self._shards:
            exp = self.expect(task_name) if callable(self.expect) else (self.expect or {})
            path = self.root / task_name
            if not path.is_dir():
                raise ArtifactMismatchError(f"{path}: no logit-cache shard for task {task_name!r}; "
                                            f"run `tagi-ds cache-logits` for it first")
            self._shards[task_name] = CacheShardReader(path, exp, verify=self.verify)
        return self._shards[task_name]

    def batch(self, task_names: Sequence[str] | str, instance_ids: Sequence[str],
              label_lengths: Sequence[int]) -> TeacherBatch:
        """`task_names`: one per row, or one name for every row."""
        names = [task_names] * len(instance_ids) if isinstance(task_names, str) else list(task_names)
        if not len(names) == len(instance_ids) == len(label_lengths):
            raise ValueError(f"teacher signal: {len(names)} task names, {len(instance_ids)} instance ids and "
                             f"{len(label_lengths)} label lengths")
        mode, rows = None, []
        for name, iid, want in zip(names, instance_ids, label_lengths):
            shard = self.shard(name)
            if mode is None:
                mode, first = shard.mode, shard
            elif shard.mode.name != mode.name or shard.mode.width != mode.width:
                raise ArtifactMismatchError(f"{shard.dir}: cache mode {shard.mode.name!r} width {shard.mode.width} "
                                            f"but {first.dir} is {mode.name!r} width {mode.width}: one batch needs one "
                                            f"mode (field 'mode' / 'k' / 'num_samples' differ)")
            have = shard.length(iid)
            if want > have:
                # a prefix of the cached labels is fine (logits at t depend on tokens < t only); longer is not
                raise ArtifactMismatchError(
                    f"{shard.dir}: instance {iid!r} has {have} cached label positions but the batch has "
                    f"{want}; the cache was built with another tokenizer or max_target_length")
            rows.append(shard.rows(iid) if want else None)
        if mode is None:
            raise ValueError("teacher signal: an empty batch")
        return stack_rows(mode, rows, [int(x) for x in label_lengths])

    def topk(self, task_name: str, instance_ids: Sequence[str],
             label_lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (N, L, k), ids (N, L, k), valid (N, L)) of a top-k cache (the interface before `batch`)."""
        b = self.batch(task_name, instance_ids, label_lengths)
        if not isinstance(b, TopKTeacher):
            raise ArtifactMismatchError(f"{self.root / task_name}: manifest field 'mode' is "
                                        f"{self.shard(task_name).mode.name!r}, not 'topk'; use .batch()")
        return b.logprobs, b.ids, b.valid
