"""Stopping a long stage cleanly when the scheduler asks: SIGTERM (what Slurm and torchrun send before killing, on
pre-emption or at the time limit) and SIGUSR1 (`#SBATCH --signal=USR1@<s>`, the warning seconds before).

A stage wraps its loop in `StopSignals()`; the handler only records the request. At its next safe point (an
optimizer step boundary, a finished unit, a written shard) the stage asks `should_stop()`, which every rank answers
together (ZeRO collectives: all ranks must stop at the same step), saves what it has, and raises `Stopped`: the CLI
prints where the state was saved and exits with EX_TEMPFAIL (75), and the same command resumes (`resume: auto`).
"""
from __future__ import annotations

import signal
from typing import Optional

import torch

from ..errors import TagiError
from .dist import collective_guard, world_size

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(TagiError):
    """A stage stopped on request after saving its state; rerun the same command to resume."""

    exit_code = 75  # EX_TEMPFAIL: a temporary failure, retrying is the right answer


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGUSR1 set a flag instead of killing the process."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: signals cannot be caught here, the stage runs to its end
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self, collective: bool = True) -> bool:
        """True when this rank (`collective=False`: ranks that work independently, e.g. teachers) or any rank (one
        small all-reduce when several ranks run in lock-step) was asked to stop."""
        flag = 1.0 if self.requested else 0.0
        if collective and world_size() > 1:
            import torch.distributed as dist

            t = torch.tensor([flag], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            with collective_guard("stop-request all-reduce"):
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0
