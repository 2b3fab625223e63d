"""One lock per stage folder: `@stage_locked("finetune")` on a recipe's `run(cfg, sub, ...)` holds the stage's lock
for the call, so a second writer of the same outputs (a Slurm requeue overlapping the old job, a second shell) exits
2 at once naming the holder's host, pid and command, instead of interleaving logs and racing on checkpoints.

    <run_dir>/.locks/<stage>.lock            exclusive for a run of the whole stage (every unit / no units)
    <run_dir>/.locks/<stage>.lock            shared, plus
    <run_dir>/.locks/<stage>__<unit>.lock    exclusive, for one unit: a finetune variant, a baseline mode,
                                             a teacher / cache array index or task
So array jobs of different units run side by side, while a whole-stage run and any unit run of the same stage
exclude each other. Under torchrun / srun only global rank 0 takes the locks (the ranks of one job are one writer).
The OS releases the locks of a process that dies (io_utils.file_lock); a run folder this user cannot write needs no
lock (its writes fail, each with its own clear error).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any, Callable, Iterator, Optional

from ..io_utils import file_lock
from .paths import RunPaths


def global_rank() -> int:
    """This process's rank as the launcher set it (before torch.distributed is initialised)."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


@contextlib.contextmanager
def stage_lock(cfg: Any, stage: str, unit: Optional[str] = None,
               log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold `stage`'s lock (or one unit's) in cfg's run folder for the block; LockHeldError (exit 2) when taken."""
    if global_rank() != 0:
        yield
        return
    paths = RunPaths.of(cfg)
    created = [d for d in [paths.run_dir, *paths.run_dir.parents] if not d.exists()]  # what the lock file creates
    if unit is None:
        locks = file_lock(exclusive=[paths.lock(stage)], stage=stage, log=log)
    else:
        locks = file_lock(shared=[paths.lock(stage)], exclusive=[paths.lock(stage, unit)],
                          stage=f"{stage} ({unit})", log=log)
    try:
        with locks:
            yield
    finally:
        for d in created:  # a refused first run leaves no empty run folder (or runs_dir) behind
            try:
                d.rmdir()
            except OSError:
                break  # not empty: the stage wrote something


def _unit_of(stage: str, arguments: dict) -> Optional[str]:
    """The unit a recipe call runs: its `sub`, else a `task=` / `array_index=` selection, else None (all)."""
    if arguments.get("sub") is not None:
        return str(arguments["sub"])
    if arguments.get("task") is not None:
        return f"task-{arguments['task']}"
    if arguments.get("array_index") is not None:
        return f"index-{str(arguments['array_index']).strip()}"
    return None


def stage_locked(stage: str) -> Callable:
    """Decorator for a recipe's `run(cfg, sub=None, *, ..., log=print)`: the call holds the stage (unit) lock."""
    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            with stage_lock(a["cfg"], stage, _unit_of(stage, a), log=a.get("log") or print):
                return fn(*args, **kwargs)
        return wrapper
    return deco
