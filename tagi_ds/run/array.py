"""Slurm job-array units: which teacher (task or category) a `SLURM_ARRAY_TASK_ID` trains or caches.

The mapping is index → unit in stable sorted order, so the same config gives the same mapping on every node and
on every resubmission (a requeued array element redoes exactly its own unit). `sbatch_line` renders the submit
command the teacher stage prints for `tagi-ds teacher --list`.

`python -m tagi_ds.run.units --config X.yaml [--index N] [key=value ...]` prints `index<TAB>unit` lines (all, or
one): the sbatch scripts call it in their dry run to show which unit an index maps to.
"""
from __future__ import annotations

import shlex
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, DataError


def _categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def array_units(task_names: Iterable[str], categories_by_task: Mapping[str, Any] | None,
                group_by: str) -> list[str]:
    """Units of one job array: sorted task names (group_by='task') or sorted categories (group_by='category').

    A task's category is its first listed category (SNI tasks list exactly one). A task without any category
    cannot be grouped by category: DataError naming it.
    """
    names = sorted(set(task_names))
    if group_by == "task":
        return names
    if group_by != "category":
        raise ConfigError(f"teacher.group_by must be 'task' or 'category', got {group_by!r}")
    cats = categories_by_task or {}
    units = set()
    for name in names:
        c = _categories(cats.get(name))
        if not c:
            raise DataError(f"task '{name}' has no category; teacher.group_by=category needs one per task "
                            f"(use teacher.group_by=task instead)")
        units.add(c[0])
    return sorted(units)


def tasks_for_unit(unit: str, task_names: Iterable[str], categories_by_task: Mapping[str, Any] | None,
                   group_by: str) -> list[str]:
    """The task names one unit trains on (sorted): the task itself, or every task whose category is `unit`."""
    names = sorted(set(task_names))
    if group_by == "task":
        if unit not in names:
            raise ConfigError(f"unknown task '{unit}' for this run")
        return [unit]
    cats = categories_by_task or {}
    out = [n for n in names if _categories(cats.get(n))[:1] == (unit,)]
    if not out:
        raise ConfigError(f"no training task has category '{unit}'")
    return out


def n_jobs(n_units: int, units_per_job: int) -> int:
    """Array elements needed for `n_units` at `units_per_job` each (the last may hold fewer)."""
    if units_per_job < 1:
        raise ConfigError(f"teacher.units_per_job must be >= 1, got {units_per_job}")
    return -(-n_units // units_per_job)


def resolve_array_index(units: Sequence[str], index: int | str, units_per_job: int = 1) -> list[str]:
    """The units of array element `index`: units[index * k : (index + 1) * k] with k = units_per_job; an index
    outside 0..jobs-1 is a ConfigError naming the index and the valid range."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise ConfigError(f"array_index must be an integer, got {index!r}") from None
    n = len(units)
    if n == 0:
        raise ConfigError(f"array_index={i}: this run has no array units (no training tasks)")
    jobs = n_jobs(n, units_per_job)
    if not 0 <= i < jobs:
        raise ConfigError(f"array_index={i} is out of range: valid indices are 0-{jobs - 1} ({n} units, "
                          f"{units_per_job} per job); submit with --array=0-{jobs - 1}")
    return list(units[i * units_per_job:(i + 1) * units_per_job])


def sbatch_line(script: str, n: int, concurrency: int | None, config: str) -> str:
    """`sbatch --array=0-{n-1}%{concurrency} {script} {config}` (no `%` cap when concurrency is 0/None)."""
    if n < 1:
        raise ConfigError(f"cannot size a job array with {n} units")
    cap = f"%{concurrency}" if concurrency else ""
    return f"sbatch --array=0-{n - 1}{cap} {shlex.quote(str(script))} {shlex.quote(str(config))}"
