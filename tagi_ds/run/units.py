"""Teacher units: a run's training tasks grouped as the teachers are (one per task, or one per category), and the
seen split's held-back instances by task name. Teacher, cache-logits, finetune and evaluation all map a task to its
teacher folder through `teacher_unit`.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from typing import Optional

from ..data.tasks import Task
from ..errors import ConfigError, TagiError
from .array import array_units, n_jobs, resolve_array_index, sbatch_line, tasks_for_unit


def teacher_unit(task: Task, group_by: str) -> str:
    """The teacher folder that holds `task`'s adapter: the task itself, or its first category."""
    if group_by == "task":
        return task.name
    if not task.categories:
        raise ConfigError(f"teacher.group_by=category but task '{task.name}' lists no category")
    return str(task.categories[0])


def unit_seed(seed: int, unit: str) -> int:
    """A teacher's own seed: its init and data order do not depend on which other units share its batch."""
    return int(hashlib.sha256(f"{seed}:teacher:{unit}".encode()).hexdigest()[:8], 16)


SHARED_INIT = "<shared init>"  # not a unit name (a task name has no angle brackets): every teacher's A under init=shared


def init_seed(cfg, unit: str) -> int:
    """The seed of a teacher's LoRA A (teacher.init): its own (per_unit), or one for all teachers (shared)."""
    return unit_seed(cfg.seed, SHARED_INIT if cfg.teacher.init == "shared" else unit)


@dataclass
class RunUnits:
    """The training tasks of a run, grouped into teacher units, and the held-back (seen) split by task name."""

    group_by: str
    units: list[str]
    tasks: dict[str, list[Task]]   # unit → its training tasks (sorted by name)
    seen: dict[str, Task]          # task name → held-back instances of that task

    def select(self, task: Optional[str] = None, array_index: Optional[str] = None,
               units_per_job: int = 1) -> list[str]:
        """All units, or the one that `task=` (a unit name, or a task of that unit) names, or array element
        `array_index`'s `units_per_job` units."""
        if task is not None and array_index is not None:
            raise ConfigError("give task=NAME or array_index=N, not both")
        if array_index is not None:
            return resolve_array_index(self.units, array_index, units_per_job)
        if task is not None:
            if task in self.tasks:
                return [task]
            owner = [u for u, ts in self.tasks.items() if any(t.name == task for t in ts)]
            if owner:
                return owner
            shown = ", ".join(self.units[:8]) + (" …" if len(self.units) > 8 else "")
            raise ConfigError(f"task={task!r} is not a training task or teacher unit of this run "
                              f"({len(self.units)} units: {shown})")
        return list(self.units)


def load_run_units(cfg) -> RunUnits:
    from ..data.registry import load_run_tasks_from_config

    splits = load_run_tasks_from_config(cfg)
    train = splits["train"]
    cats = {t.name: tuple(t.categories) for t in train}
    names = [t.name for t in train]
    units = array_units(names, cats, cfg.teacher.group_by)
    by_name = {t.name: t for t in train}
    grouped = {u: [by_name[n] for n in tasks_for_unit(u, names, cats, cfg.teacher.group_by)] for u in units}
    return RunUnits(cfg.teacher.group_by, units, grouped, {t.name: t for t in splits.get("seen", [])})


def main(argv: list[str] | None = None) -> int:
    """`python -m tagi_ds.run.units --config X [--index N] [--sbatch S] [key=value ...]`: index<TAB>unit lines."""
    p = argparse.ArgumentParser(prog="python -m tagi_ds.run.units",
                                description="print the job-array units of a config (index<TAB>unit)")
    p.add_argument("--config", required=True)
    p.add_argument("--index", default=None, help="print only this index's unit (error when out of range)")
    p.add_argument("--sbatch", default=None, help="also print the submit line for this sbatch script")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from ..config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        units, k = load_run_units(cfg).units, cfg.teacher.units_per_job
        indices = [int(args.index)] if args.index is not None else range(n_jobs(len(units), k))
        for i in indices:
            print(f"{i}\t{' '.join(resolve_array_index(units, i, k))}")
        if args.sbatch:
            print(sbatch_line(args.sbatch, n_jobs(len(units), k), cfg.teacher.array_concurrency, args.config))
    except TagiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
