"""The training engine: `deepspeed.initialize` driven directly (no HF Trainer), or a plain torch loop, behind one API.

    info = init_distributed(timeout_s)                       # before building a ZeRO-3 model
    ds = ds_config_from_file("ds_configs/zero3.json", micro_batch=8, grad_accum=1, lr=1e-3, ...)
    with zero3_model_context(ds):
        backbone = AutoModelForCausalLM.from_config(cfg)      # partitioned at construction under ZeRO-3
    model = MyWrapper(backbone.requires_grad_(False), hypernet)
    eng = Engine(model, ds, lr=1e-3, warmup_steps=10, total_steps=100, out_dir=run_dir, ...)
    progress = eng.resume_latest() or {"step": 0}
    while eng.global_step < 100:
        loss = global_token_mean(*eng(batch))                # (loss_sum, n_tokens) from the model
        eng.backward(loss); eng.step(tokens=n)
        if eng.global_step % every == 0: eng.save(eng.global_step, {"data_position": ...})

Only trainable parameters reach the optimizer (a torch AdamW client optimizer: no cpu_adam JIT build) and the
checkpoints (`exclude_frozen_parameters=True`); the frozen backbone stays frozen and out of every checkpoint.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import ArtifactMismatchError, ConfigError
from ..io_utils import atomic_path
from . import checkpoint as ck
from ..run.dist import DistributedFailure, barrier, collective_guard, init_distributed, rank, world_size
from .logging import TrainLogger
from .optim import adamw
from .schedule import Schedule, make_lr_lambda

CKPT_SUBDIR = "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float,
                  lr_scale_of: Optional[Callable[[str], float]] = None) -> list[dict]:
    """AdamW groups: decay matrices only, not biases / norms; a parameter whose `lr_scale_of(name)` is not 1 gets its
    own group with lr × scale (the unscaled groups come first: `Engine.lr` reports the first group's lr).
    Under ZeRO-3 a partitioned parameter has shape [0]: use ds_shape."""
    def ndim(p: torch.nn.Parameter) -> int:
        return len(getattr(p, "ds_shape", p.shape))

    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in named:
        scale = float(lr_scale_of(name)) if lr_scale_of is not None else 1.0
        buckets.setdefault((scale, ndim(p) >= 2), []).append(p)
    order = sorted(buckets, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    return [{"params": buckets[k], "weight_decay": weight_decay if k[1] else 0.0, "lr": lr * k[0]} for k in order]


class Engine:
    """One training loop's optimizer, schedule, distributed wrapping, checkpoints and logs."""

    def __init__(self, model: torch.nn.Module, ds_config: Optional[dict], *, lr: float, warmup_steps: int,
                 total_steps: int, schedule: Schedule = "linear", weight_decay: float = 0.0, grad_clip: float = 0.0,
                 use_deepspeed: bool = True, out_dir: str | Path, seed: int = 0, log_dir: Optional[str | Path] = None,
                 grad_accum: int = 1, keep_checkpoints: int = 2, timeout_s: float = 600.0,
                 show_progress: bool = True, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_scale_of: Optional[Callable[[str], float]] = None):
        self.use_deepspeed = use_deepspeed
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / CKPT_SUBDIR
        self.seed = seed
        self.total_steps = total_steps
        self.keep_checkpoints = keep_checkpoints
        self.grad_clip = grad_clip
        seed_everything(seed)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable = [p for _, p in named]
        if not trainable:
            raise ConfigError("the model has no trainable parameters (requires_grad=True); nothing to train")
        lr_fn = make_lr_lambda(warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
        groups = _param_groups(named, weight_decay, lr, lr_scale_of)
        self._ds = None
        if use_deepspeed:
            if ds_config is None:
                raise ConfigError("use_deepspeed=True needs a DeepSpeed config (distributed.ds_config)")
            init_distributed(timeout_s)
            import deepspeed

            self.grad_accum = int(ds_config.get("gradient_accumulation_steps", 1))
            if "optimizer" in ds_config:  # DeepSpeed builds its own optimizer; schedule its inner torch optimizer
                self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                    model=model, model_parameters=groups, config=ds_config, dist_init_required=False,
                    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(getattr(opt, "optimizer", opt),
                                                                               lr_fn))
            else:
                client = adamw(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
                sched = torch.optim.lr_scheduler.LambdaLR(client, lr_fn)
                self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                    model=model, optimizer=client, lr_scheduler=sched, config=ds_config, dist_init_required=False)
            self._module = self._ds.module
        else:
            if world_size() > 1:
                raise ConfigError("use_deepspeed=False is a one-process loop; launch without torchrun/srun "
                                  "or set distributed.use_deepspeed=true")
            self.grad_accum = grad_accum
            self.optimizer = adamw(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
            self._module = model
            self._trainable = trainable
        self._plain_step = 0
        self._micro = 0
        self.skipped_updates = 0  # plain loop: optimizer steps dropped for a non-finite gradient norm
        self._logger: Optional[TrainLogger] = None
        self._log_dir = log_dir
        self._show_progress = show_progress
        self._t_last = time.perf_counter()
        self._t_log = self._t_last
        self._tokens_since_log = 0
        self._steps_since_log = 0

    # ------------------------------------------------------------------------------------ properties
    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def global_step(self) -> int:
        return int(self._ds.global_steps) if self._ds is not None else self._plain_step

    @property
    def rank(self) -> int:
        return rank()

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def is_main(self) -> bool:
        return rank() == 0

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def logger(self) -> TrainLogger:
        if self._logger is None:  # created lazily so a resumed run's bar starts at the resumed step
            self._logger = TrainLogger(self._log_dir, total_steps=self.total_steps, enabled=self.is_main,
                                       initial_step=self.global_step, show_progress=self._show_progress)
        return self._logger

    # ------------------------------------------------------------------------------------- training
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with collective_guard("forward"):
            return self._ds(*args, **kwargs) if self._ds is not None else self._module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's loss (scaled by 1/grad_accum, as DeepSpeed does)."""
        with collective_guard("backward"):
            if self._ds is not None:
                self._ds.backward(loss)
            else:
                (loss / self.grad_accum).backward()

    def step(self, tokens: int = 0) -> bool:
        """Call after every micro batch; returns True when it was an optimizer step (accumulation boundary)."""
        self._tokens_since_log += int(tokens)
        with collective_guard("optimizer step"):
            if self._ds is not None:
                boundary = self._ds.is_gradient_accumulation_boundary()
                self._ds.step()
            else:
                self._micro += 1
                boundary = self._micro % self.grad_accum == 0
                if boundary:
                    clip = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
                    norm = torch.nn.utils.clip_grad_norm_(self._trainable, clip)
                    if torch.isfinite(norm):
                        self.optimizer.step()
                        self.scheduler.step()
                        self._plain_step += 1
                    else:  # an inf/nan gradient would turn every weight into nan: drop this update, keep going
                        self.skipped_updates += 1
                        boundary = False
                    self.optimizer.zero_grad(set_to_none=True)
        if boundary:
            self._steps_since_log += 1
            self.logger.advance()
        return boundary

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Rank 0 writes `scalars` plus lr, step_time_s and tokens_per_s (this rank's tokens × world, since the
        last call) to TensorBoard and the bar. No collectives: safe to call on rank 0 only. Reduce losses over ranks
        with `all_reduce_mean` (on every rank) before passing them."""
        now = time.perf_counter()
        dt = max(now - self._t_log, 1e-9)
        extra = {"lr": self.lr, "step_time_s": dt / max(1, self._steps_since_log),
                 "tokens_per_s": self._tokens_since_log * self.world_size / dt if self._tokens_since_log else None}
        self.logger.log_scalars(step, {**extra, **scalars})
        self._t_log, self._tokens_since_log, self._steps_since_log = now, 0, 0

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self, step: int, progress: dict) -> Path:
        """Save a resumable checkpoint at `step` on every rank (collective); `progress` (seed, data position, ...)
        is stored per rank with the RNG states. `latest` moves only once the checkpoint is complete; the oldest
        checkpoints beyond `keep_checkpoints` are deleted."""
        tag = ck.tag_for(step)
        tag_dir = self.ckpt_root / tag
        progress = {**progress, "seed": self.seed, "step": step, "global_step": self.global_step}
        if (tag_dir / ck.MANIFEST).is_file():
            return tag_dir  # this very step is already saved and complete (e.g. periodic save == final save)
        if self.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)  # leftovers of a save that was killed half-way
            tag_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        with collective_guard("checkpoint save"):
            if self._ds is not None:
                self._ds.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"tagi_step": step},
                                         save_latest=False, exclude_frozen_parameters=True)
                ck.save_consolidated(tag_dir, self._module)  # what a resume on another world size loads
            else:
                self._save_plain(tag_dir)
        ck.save_progress(tag_dir, self.rank, progress)
        barrier()
        if self.is_main:
            ck.write_manifest(tag_dir, step, self.world_size)
            ck.write_latest(self.ckpt_root, tag)
            ck.prune_checkpoints(self.ckpt_root, self.keep_checkpoints, tag)
        barrier()
        return tag_dir

    def _save_plain(self, tag_dir: Path) -> None:
        named = ck.trainable_named_parameters(self._module)
        with atomic_path(tag_dir / "trainable.pt") as tmp:
            torch.save({n: p.detach().cpu() for n, p in named}, tmp)
        with atomic_path(tag_dir / "optimizer.pt") as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "global_step": self._plain_step, "micro_step": self._micro}, tmp)

    def resume_latest(self) -> Optional[dict]:
        """Load the checkpoint `latest` names (after checking every file against its manifest) and return its
        progress record, with this rank's RNG states restored; None when there is no checkpoint yet."""
        tag = ck.read_latest(self.ckpt_root)
        if tag is None:
            return None
        tag_dir = self.ckpt_root / tag
        man = ck.verify_checkpoint(tag_dir)
        saved_world = int(man.get("world_size", self.world_size))
        if self._ds is not None and saved_world != self.world_size:
            return self._resume_elastic(tag_dir, saved_world)
        if self._ds is not None:
            try:
                with collective_guard("checkpoint load"):
                    path, _ = self._ds.load_checkpoint(str(self.ckpt_root), tag=tag, load_module_strict=False,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
            except DistributedFailure:  # a dead peer is not a corrupt checkpoint
                raise
            except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
                raise ArtifactMismatchError(f"{tag_dir}: DeepSpeed could not load this checkpoint "
                                            f"({type(e).__name__}: {str(e)[:300]})") from e
            if path is None:
                raise ArtifactMismatchError(f"{tag_dir}: DeepSpeed found no loadable checkpoint here")
        else:
            self._load_plain(tag_dir)
        progress = ck.load_progress(tag_dir, self.rank)
        barrier()
        return progress

    def _resume_elastic(self, tag_dir: Path, saved_world: int) -> dict:
        """Resume on another world size: ZeRO's optimizer states are partitioned per rank and cannot be reshaped, so
        the consolidated trainable weights, the step (and with it the lr schedule) and the global data position come
        back; Adam's moments restart from zero (the next loss is the uninterrupted run's; later updates differ)."""
        ck.load_consolidated(tag_dir, self._module)
        if hasattr(self.optimizer, "refresh_fp32_params"):  # ZeRO keeps fp32 master copies beside the parameters
            self.optimizer.refresh_fp32_params()
        progress = ck.load_progress(tag_dir, self.rank)
        step = int(progress["step"])
        self._ds.global_steps = step
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()  # the lr of step `step`, as the uninterrupted run has it
        if self.is_main:
            print(f"resumed {tag_dir} (written by {saved_world} ranks) on {self.world_size}: weights, step {step} and "
                  f"data position restored; the optimizer's moments restart", flush=True)
        barrier()
        return progress

    def _load_plain(self, tag_dir: Path) -> None:
        weights = ck.load_torch_file(tag_dir / "trainable.pt")
        state = ck.load_torch_file(tag_dir / "optimizer.pt")
        params = dict(ck.trainable_named_parameters(self._module))
        if set(weights) != set(params):
            raise ArtifactMismatchError(f"{tag_dir / 'trainable.pt'}: trainable parameter names differ from the "
                                        f"model's (checkpoint of another configuration?)")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._plain_step, self._micro = int(state["global_step"]), int(state["micro_step"])

    def export_trainable(self, out_dir: str | Path, config_dict: dict) -> Optional[Path]:
        return ck.export_trainable(out_dir, self._module, config_dict)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
