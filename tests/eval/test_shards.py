"""The shard arithmetic: parsing shard=i/n and shard=array, a process's shard under a launcher, work units bounded
in tasks and in teacher bytes, contiguous balanced assignment, shard files read back only under their own key."""
from __future__ import annotations

import json

import pytest

from tagi_ds.data.tasks import Instance, Task
from tagi_ds.errors import ConfigError
from tagi_ds.eval.shards import (Shard, assign_units, parse_shard, process_shard, read_shard, shard_tasks,
                                 work_units, write_shard)


def _task(name: str, n: int, cat: str = "c") -> Task:
    return Task(name, "", (), (), tuple(Instance(f"{name}-{i}", "x", ("y",), "y") for i in range(n)), (cat,))


def test_parse_shard_and_process_shard():
    assert parse_shard(None) is None
    assert parse_shard("2/4") == Shard(2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("array", env) == Shard(2, 3)
    for bad, msg in (("4/4", "expected 0 <= i < n"), ("1", "expected i/n"), ("a/b", "expected i/n")):
        with pytest.raises(ConfigError, match=msg):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("array", {})
    assert process_shard(None, 0, 1) == Shard(0, 1)
    assert process_shard(None, 1, 2) == Shard(1, 2)
    assert process_shard(Shard(2, 3), 1, 4) == Shard(9, 12)  # array element 2 of 3, rank 1 of 4 inside it


def test_work_units_bound_tasks_and_distinct_teacher_bytes():
    tasks = [_task(f"t{i}", 2, cat) for i, cat in enumerate("aabbbcad")]
    assert work_units(tasks, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    size = {"a": 10, "b": 10, "c": 30, "d": 5}
    units = work_units(tasks, 8, lambda t: t.categories[0], size.__getitem__, 20)
    # a+b fit (20); c alone exceeds nothing else fits with it; a+d (15)
    assert units == [[0, 1, 2, 3, 4], [5], [6, 7]]
    for u in units:
        held = {tasks[i].categories[0] for i in u}
        assert sum(size[c] for c in held) <= 20 or len(held) == 1  # a unit larger than the bound goes alone
    with pytest.raises(ConfigError, match="tasks_per_batch"):
        work_units(tasks, 0)


def test_assign_units_contiguous_and_balanced():
    sizes = [5, 5, 5, 5, 5, 5, 5, 5]
    assert assign_units(sizes, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    owner = assign_units([1, 9, 1, 1, 1, 1, 1, 1, 1, 1], 2)
    assert owner == sorted(owner)  # contiguous runs, in unit order
    assert assign_units([3, 3], 4) == [1, 3]  # fewer units than shards: some shards are empty
    tasks = [_task(f"t{i}", 3) for i in range(5)]
    units = work_units(tasks, 1)
    answered = [shard_tasks(tasks, units, Shard(i, 3)) for i in range(3)]
    assert [i for part in answered for u in part for i in u] == list(range(5))  # every task exactly once, in order
    assert [len(part) for part in answered] == [2, 1, 2]


def test_shard_file_read_back_only_under_its_key(tmp_path):
    path = tmp_path / "m" / "s" / "00000-of-00001.json"
    assert read_shard(path, "k") is None
    write_shard(path, "k", [{"task": "t", "id": "1", "prediction": "p"}], {"seconds": 1.0})
    assert read_shard(path, "k")["rows"] == [{"task": "t", "id": "1", "prediction": "p"}]
    assert read_shard(path, "other") is None
    path.write_text(path.read_text()[:-5])  # a torn file (never published by write_shard; a copy gone wrong)
    assert read_shard(path, "k") is None
    path.write_text(json.dumps({"key": "k", "rows": "nope"}))
    assert read_shard(path, "k") is None
