"""Rank-0 training logs: a tqdm bar and TensorBoard scalars. Other ranks get a logger that does nothing."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional


class TrainLogger:
    """`log_scalars(step, {...})` writes every value under `train/<name>` and shows a few on the bar."""

    def __init__(self, log_dir: Optional[str | Path], *, total_steps: int, enabled: bool, initial_step: int = 0,
                 show_progress: bool = True, desc: str = "train"):
        self.enabled = enabled
        self._writer = None
        self._bar = None
        if not enabled:
            return
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if self._writer is not None:
            for k, v in clean.items():
                self._writer.add_scalar(k if "/" in k else f"train/{k}", v, global_step=step)
            self._writer.flush()
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "lr", "tokens_per_s")}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
