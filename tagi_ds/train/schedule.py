"""Learning-rate schedules: linear warmup, then linear decay to 0, cosine decay to 0, or constant.

Pure functions of the optimizer step, so the same multiplier drives a plain torch loop and a DeepSpeed engine
(through `torch.optim.lr_scheduler.LambdaLR`), and a resumed run continues on the same curve.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ..errors import ConfigError

Schedule = Literal["linear", "cosine", "constant"]


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: Schedule) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based: the first update uses step 0).

    Warmup ramps (step+1)/warmup_steps so the very first update is not wasted at lr 0; after warmup the lr decays
    from 1 at `warmup_steps` to 0 at `total_steps` (linear/cosine) or stays at 1 (constant).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule must be one of 'linear', 'cosine', 'constant', got {schedule!r}")


def make_lr_lambda(*, warmup_steps: int, total_steps: int, schedule: Schedule) -> Callable[[int], float]:
    if schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"schedule must be one of 'linear', 'cosine', 'constant', got {schedule!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")

    def fn(step: int) -> float:  # a plain function: LambdaLR.state_dict() then stores nothing for it
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)

    return fn


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_lr_lambda(warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule))
