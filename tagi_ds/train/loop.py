"""A flat AdamW loop for one process and one model (the backbone stage's copy pretraining and the multitask
baselines): lr = peak × warmup × linear decay, clipping, a loss record per step, TensorBoard through a TrainLogger.
The hypernetwork stages run on the DeepSpeed engine instead (hypernet_loop.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from .optim import adamw
from .schedule import lr_multiplier


@dataclass
class LoopResult:
    steps: int
    seconds: float
    losses: list[float]  # one per step


def train_loop(model: torch.nn.Module, next_batch: Callable[[int], dict[str, torch.Tensor]], *, steps: int,
               lr: float, time_budget_s: Optional[float] = None, warmup_steps: int = 50, weight_decay: float = 0.01,
               betas: tuple[float, float] = (0.9, 0.98), grad_clip: float = 1.0, device: str = "cpu",
               logger=None, log_every: int = 10, anneal_to_budget: bool = True) -> LoopResult:
    """AdamW on the trainable parameters; lr = peak × warmup × linear decay. With `anneal_to_budget` the decay's
    progress is the larger of step/steps and elapsed/time_budget_s, so the lr reaches 0 exactly when the budget
    ends (a time-bounded stage: the backbone's copy pretraining). Without it the schedule is by steps alone and the
    budget only stops a run that is too slow: the same steps give the same model whatever the machine's load."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train_loop: the model has no trainable parameters")
    opt = adamw(params, lr=lr, betas=betas, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        elapsed = time.perf_counter() - t0
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        mult = lr_multiplier(step, warmup_steps=warmup_steps, total_steps=steps, schedule="linear")
        if anneal_to_budget and time_budget_s is not None and step >= warmup_steps:
            mult = min(mult, max(0.0, 1.0 - elapsed / time_budget_s))
        for g in opt.param_groups:
            g["lr"] = lr * mult
        batch = {k: v.to(device) for k, v in next_batch(step).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_loop: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        if logger is not None:
            logger.advance()
            if step % log_every == 0 or step == 1:
                logger.log_scalars(step, {"loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                                          "lr": lr * mult, "seconds": time.perf_counter() - t0})
    model.eval()
    return LoopResult(steps=step, seconds=time.perf_counter() - t0, losses=losses)
