"""Sharded, resumable evaluation: which tasks a process answers, and the shard files a rerun reuses.

Work units. Each (method, split) is cut into units of consecutive tasks (`work_units`: at most eval.tasks_per_batch
tasks, a teacher unit also at most eval.teacher_group_bytes of adapters). Every generation and scoring batch is
formed inside one unit, and units do not depend on how many processes share the work: a split answered by 1 process
or by 8 gives the same predictions, bit for bit on the same hardware.

Shards. A shard is a contiguous run of units, balanced by instance count (`assign_units`); shard i of n is answered
by one process. Under torchrun / srun rank r of W takes shard r of W; a Slurm array element `shard=i/n` with W ranks
inside takes shards i*W+r of n*W (`process_shard`).

Shard files. `eval/shards/<method>/<split>/<i>-of-<n>.json` holds one shard's rows and stats, published atomically
once the shard is complete. Its `key` hashes everything its rows depend on: the evaluation's identity, the
fingerprint of the files the method reads, the execution plan (batch sizes, units) and the shard's instance ids. A
rerun reads back every shard whose key matches and answers only the others; a file of another configuration, another
plan or an interrupted write is never reused.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..data.tasks import Task
from ..errors import ConfigError
from ..io_utils import atomic_write_json, sha256_json
from ..run.paths import RunPaths, check_unit_name

SHARDS_DIR = "shards"
FORMAT = 1


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard={self.index}/{self.count}: expected 0 <= i < n with n >= 1")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: Optional[str], environ: Optional[dict] = None) -> Optional[Shard]:
    """`shard=i/n` on the command line, or `shard=array`: this Slurm array element's index among the array's
    elements (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT). None: not given."""
    if text is None:
        return None
    env = os.environ if environ is None else environ
    if text.strip() == "array":
        try:
            idx, lo, n = (int(env[k]) for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                 "SLURM_ARRAY_TASK_COUNT"))
        except (KeyError, ValueError):
            raise ConfigError("shard=array needs SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT "
                              "(run it as a Slurm array element, or give shard=i/n)") from None
        return Shard(idx - lo, n)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard={text!r}: expected i/n (this process answers shard i of n, 0-based) or 'array'") \
            from None
    return Shard(i, n)


def process_shard(given: Optional[Shard], rank: int, world_size: int) -> Shard:
    """The shard this process answers: rank r of W inside array element / command-line shard i of n takes i*W+r."""
    base = given or Shard(0, 1)
    return Shard(base.index * world_size + rank, base.count * world_size)


# ------------------------------------------------------------------------------------------------ units
def work_units(tasks: Sequence[Task], max_tasks: int, unit_of: Optional[Callable[[Task], str]] = None,
               unit_bytes: Optional[Callable[[str], int]] = None, max_bytes: Optional[int] = None
               ) -> list[list[int]]:
    """Consecutive task indices, at most `max_tasks` per unit; with `unit_of` / `unit_bytes` (teachers: the adapter
    each task reads and its size) a unit also holds at most `max_bytes` of distinct adapters (one adapter larger than
    that makes a unit of its own tasks)."""
    if max_tasks < 1:
        raise ConfigError(f"eval.tasks_per_batch must be >= 1, got {max_tasks}")
    units: list[list[int]] = []
    cur: list[int] = []
    held: set[str] = set()
    size = 0
    for ti, task in enumerate(tasks):
        key = unit_of(task) if unit_of is not None else None
        extra = unit_bytes(key) if key is not None and key not in held and unit_bytes is not None else 0
        over_bytes = max_bytes is not None and size + extra > max_bytes
        if cur and (len(cur) >= max_tasks or over_bytes):
            units.append(cur)
            cur, held, size = [], set(), 0
            extra = unit_bytes(key) if key is not None and unit_bytes is not None else 0
        cur.append(ti)
        if key is not None and key not in held:
            held.add(key)
            size += extra
    if cur:
        units.append(cur)
    return units


def assign_units(sizes: Sequence[int], count: int) -> list[int]:
    """The shard of each unit: contiguous runs balanced by size (unit j goes to the shard its midpoint falls in,
    so shard order follows unit order). A shard may be empty when there are fewer units than shards."""
    total = sum(sizes)
    out, before = [], 0
    for s in sizes:
        mid = before + s / 2
        out.append(min(count - 1, int(count * mid / total)) if total else 0)
        before += s
    return out


def shard_tasks(tasks: Sequence[Task], units: Sequence[Sequence[int]], shard: Shard) -> list[list[int]]:
    """The units (task index lists) that `shard` answers."""
    owner = assign_units([sum(len(tasks[i].instances) for i in u) for u in units], shard.count)
    return [list(u) for u, o in zip(units, owner) if o == shard.index]


# ------------------------------------------------------------------------------------------------ files
def shard_path(paths: RunPaths, method: str, split: str, shard: Shard) -> Path:
    return (paths.eval / SHARDS_DIR / check_unit_name(method) / check_unit_name(split)
            / f"{shard.index:05d}-of-{shard.count:05d}.json")


def artifact_fingerprint(files: Sequence[Path]) -> str:
    """Hash of (path, size, mtime) of the files a method reads: a retrained baseline, teacher or export changes it
    without hashing gigabytes."""
    stats = []
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        stats.append([str(f), st.st_size, st.st_mtime_ns])
    return sha256_json(stats)


def shard_key(identity_hash: str, method: str, split: str, shard: Shard, fingerprint: str, plan: dict[str, Any],
              tasks: Sequence[Task], units: Sequence[Sequence[int]]) -> str:
    """Everything a shard's rows depend on (see the module docstring)."""
    ids = [[[tasks[i].name, [inst.id for inst in tasks[i].instances]] for i in u] for u in units]
    return sha256_json({"format": FORMAT, "identity": identity_hash, "method": method, "split": split,
                        "shard": [shard.index, shard.count], "artifacts": fingerprint, "plan": plan, "units": ids})


def write_shard(path: Path, key: str, rows: list[dict], stats: dict[str, Any]) -> None:
    """Publish one finished shard (atomic: a reader sees all of it or nothing)."""
    who = {"rank": int(os.environ.get("RANK", 0)), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
           "host": socket.gethostname(), "pid": os.getpid()}
    atomic_write_json(path, {"format": FORMAT, "key": key, "written_by": who, "stats": stats, "rows": rows})


def read_shard(path: Path, key: str) -> Optional[dict]:
    """The shard file's content when it is complete and of this key; None otherwise (absent, unreadable, or of
    another configuration / plan: it will be answered again and overwritten)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("key") != key or not isinstance(obj.get("rows"), list):
        return None
    return obj
