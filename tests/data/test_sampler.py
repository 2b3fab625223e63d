"""TaskGroupedSampler: coverage across ranks, equal step counts, grouping, determinism."""
from __future__ import annotations

from collections import Counter

import pytest

from tagi_ds.data.sampler import TaskGroupedSampler

SIZES = [13, 1, 40, 7, 0, 25, 8, 4]


def _all(sizes):
    return Counter((t, i) for t, s in enumerate(sizes) for i in range(s))


def _check_batch(batch, k, m):
    per_task = Counter(t for t, _ in batch)
    assert 1 <= len(per_task) <= k
    assert all(n <= m for n in per_task.values())


@pytest.mark.parametrize("k,m", [(2, 4), (3, 5), (4, 8), (1, 1)])
def test_two_ranks_cover_every_instance_once_when_even(k, m):
    # Find an epoch whose batch count is even, so no padding is needed and coverage must be exact.
    for epoch in range(20):
        s0 = TaskGroupedSampler(SIZES, k, m, rank=0, world_size=2, seed=5)
        s0.set_epoch(epoch)
        if s0.num_padded == 0:
            break
    s1 = TaskGroupedSampler(SIZES, k, m, rank=1, world_size=2, seed=5)
    s1.set_epoch(epoch)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == len(s0) == len(s1)
    got = Counter(p for b in b0 + b1 for p in b)
    assert got == _all(SIZES)
    assert not {p for b in b0 for p in b} & {p for b in b1 for p in b}  # disjoint shards
    for b in b0 + b1:
        _check_batch(b, k, m)


def test_uneven_batch_count_is_padded_by_repeating():
    sizes = [5]  # one task, m=2 → 3 global batches over 2 ranks
    s0 = TaskGroupedSampler(sizes, 2, 2, rank=0, world_size=2, seed=0)
    s1 = TaskGroupedSampler(sizes, 2, 2, rank=1, world_size=2, seed=0)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == 2 and s0.num_padded == 1
    got = Counter(p for b in b0 + b1 for p in b)
    assert set(got) == set(_all(sizes))  # everything at least once
    repeated = [p for p, n in got.items() if n > 1]
    assert sorted(repeated) == sorted(b1[-1]) == sorted(s0.global_batches()[0])  # the pad is batch 0 again
    d0 = TaskGroupedSampler(sizes, 2, 2, rank=0, world_size=2, seed=0, drop_last=True)
    d1 = TaskGroupedSampler(sizes, 2, 2, rank=1, world_size=2, seed=0, drop_last=True)
    assert len(list(d0)) == len(list(d1)) == 1 and d0.num_padded == 0


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_same_step_count_and_full_coverage(world):
    samplers = [TaskGroupedSampler(SIZES, 3, 4, rank=r, world_size=world, seed=1) for r in range(world)]
    outs = [list(s) for s in samplers]
    assert len({len(o) for o in outs}) == 1
    got = Counter(p for o in outs for b in o for p in b)
    assert set(got) == set(_all(SIZES))
    assert sum(got.values()) - sum(SIZES) == sum(len(b) for b in samplers[0].global_batches()[:samplers[0].num_padded])


def test_deterministic_by_seed_and_epoch():
    a = TaskGroupedSampler(SIZES, 2, 4, seed=3)
    b = TaskGroupedSampler(SIZES, 2, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and Counter(p for x in a for p in x) == _all(SIZES)
    a.set_epoch(0)
    assert list(a) == first
    assert list(TaskGroupedSampler(SIZES, 2, 4, seed=4)) != first


def test_batches_mix_k_tasks():
    s = TaskGroupedSampler([50] * 10, 4, 5, seed=0)
    batches = list(s)
    full = [b for b in batches if len({t for t, _ in b}) == 4]
    assert len(full) >= len(batches) - 1  # only the tail may hold fewer tasks
    assert all(len(b) == 20 for b in full)


def test_dataloader_integration():
    import torch

    from tagi_ds.data.collate import TaskInstanceDataset
    from tagi_ds.data.tasks import Instance, Task

    tasks = [Task(f"t{j}", "d", (), (), tuple(Instance(f"t{j}-{i}", "x", ("y",), "y") for i in range(n)))
             for j, n in enumerate([3, 5])]
    ds = TaskInstanceDataset(tasks)
    sampler = TaskGroupedSampler(ds.task_sizes, 2, 2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=lambda pairs: [i.id for _, i in pairs])
    ids = [i for batch in loader for i in batch]
    assert sorted(ids) == sorted(i.id for t in tasks for i in t.instances)
