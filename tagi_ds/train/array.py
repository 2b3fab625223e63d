"""Slurm job-array units: which teacher (task or category) a `SLURM_ARRAY_TASK_ID` trains or caches.

The mapping is index → unit in stable sorted order, so the same config gives the same mapping on every node and
on every resubmission (a requeued array element redoes exactly its own unit). `sbatch_line` renders the submit
command the teacher stage prints for `tagi-ds teacher --list`.

`python -m tagi_ds.train.array --config X.yaml [--index N] [key=value ...]` prints `index<TAB>unit` lines (all, or
one): the sbatch scripts call it in their dry run to show which unit an index maps to.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, DataError, TagiError


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


def resolve_array_index(units: Sequence[str], index: int | str) -> str:
    """The unit at `index`; an index outside 0..len-1 is a ConfigError naming the index and the valid range."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise ConfigError(f"array_index must be an integer, got {index!r}") from None
    n = len(units)
    if n == 0:
        raise ConfigError(f"array_index={i}: this run has no array units (no training tasks)")
    if not 0 <= i < n:
        raise ConfigError(f"array_index={i} is out of range: valid indices are 0-{n - 1} ({n} units); "
                          f"submit with --array=0-{n - 1}")
    return units[i]


def sbatch_line(script: str, n: int, concurrency: int | None, config: str) -> str:
    """`sbatch --array=0-{n-1}%{concurrency} {script} {config}` (no `%` cap when concurrency is 0/None)."""
    if n < 1:
        raise ConfigError(f"cannot size a job array with {n} units")
    cap = f"%{concurrency}" if concurrency else ""
    return f"sbatch --array=0-{n - 1}{cap} {shlex.quote(str(script))} {shlex.quote(str(config))}"


def _task_view(loaded: Any) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Names and categories of the training tasks, from what the data registry returns."""
    train = None
    for attr in ("train", "train_tasks", "seen"):
        if hasattr(loaded, attr):
            train = getattr(loaded, attr)
            break
        if isinstance(loaded, Mapping) and attr in loaded:
            train = loaded[attr]
            break
    if train is None:
        train = loaded
    if isinstance(train, Mapping):
        train = list(train.values())
    names = [t.name for t in train]
    return names, {t.name: tuple(t.categories) for t in train}


def array_units_from_config(cfg: Any) -> list[str]:
    """The array units of a run's training tasks (data read through the data registry)."""
    from ..data.registry import load_run_tasks_from_config  # lazy: data loading is heavy and not always needed

    names, cats = _task_view(load_run_tasks_from_config(cfg))
    return array_units(names, cats, cfg.teacher.group_by)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tagi_ds.train.array",
                                description="print the job-array units of a config (index<TAB>unit)")
    p.add_argument("--config", required=True)
    p.add_argument("--index", default=None, help="print only this index's unit (error when out of range)")
    p.add_argument("--sbatch", default=None, help="also print the submit line for this sbatch script")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from ..config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        units = array_units_from_config(cfg)
        if args.index is not None:
            print(f"{int(args.index)}\t{resolve_array_index(units, args.index)}")
        else:
            for i, u in enumerate(units):
                print(f"{i}\t{u}")
        if args.sbatch:
            print(sbatch_line(args.sbatch, len(units), cfg.teacher.array_concurrency, args.config))
    except TagiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
