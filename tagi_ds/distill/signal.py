"""Teacher signal: where the teacher's top-k comes from (disk cache today, a live model later), behind one Protocol.

Losses take padded (N, L, k) tensors and never care about the source (DistillKit's idea).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, Union, runtime_checkable

import torch

from ..errors import ArtifactMismatchError
from .logit_cache import CacheShardReader

Expect = Union[Mapping[str, Any], Callable[[str], Mapping[str, Any]]]


@runtime_checkable
class TeacherSignal(Protocol):
    def topk(self, task_name: str, instance_ids: Sequence[str],
             label_lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (N, L, k) float32 padded with 0, ids (N, L, k) int64 padded with 0, valid (N, L) bool),
        L = max(label_lengths); row i holds the teacher's top-k at the first label_lengths[i] label positions."""
        ...


class CachedTeacherSignal:
    """Reads `<cache_root>/<task>/` shards, opened (and checksummed) lazily the first time a task is asked for.

    `expect` is a dict of manifest fields every shard must match, or a function task -> dict (e.g. to include the
    per-task teacher adapter hash).
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

    def topk(self, task_name: str, instance_ids: Sequence[str],
             label_lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shard = self.shard(task_name)
        if len(instance_ids) != len(label_lengths):
            raise ValueError(f"topk: {len(instance_ids)} instance ids but {len(label_lengths)} label lengths")
        n, L, k = len(instance_ids), max([0, *map(int, label_lengths)]), shard.k
        lp = torch.zeros(n, L, k, dtype=torch.float32)
        ids = torch.zeros(n, L, k, dtype=torch.long)
        valid = torch.zeros(n, L, dtype=torch.bool)
        for i, (iid, want) in enumerate(zip(instance_ids, label_lengths)):
            c_lp, c_ids = shard.get(iid)  # (Lc, k)
            if want > c_lp.shape[0]:
                # a prefix of the cached labels is fine (logits at t depend on tokens < t only); longer is not
                raise ArtifactMismatchError(
                    f"{shard.dir}: instance {iid!r} has {c_lp.shape[0]} cached label positions but the batch has "
                    f"{want}; the cache was built with another tokenizer or max_target_length")
            lp[i, :want], ids[i, :want], valid[i, :want] = c_lp[:want], c_ids[:want], True
        return lp, ids, valid
