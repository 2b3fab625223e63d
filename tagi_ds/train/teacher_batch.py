"""Train k independent LoRA teachers in one process, one batch, one backward: the batched multi-teacher trainer.

The k teachers share the frozen backbone's forward (BatchedLoraHooks gives every row its own unit's A/B), yet each
ends exactly as if it had been trained alone, because everything that touches the trainable weights is separable:
- init: each unit's A is drawn from its own seeded generator (PEFT: kaiming-uniform(a=√5) A, zero B);
- data: each unit draws its batches from its own seeded stream (per-unit shuffles, epochs, position);
- loss: Σ_units mean CE over that unit's label tokens (a global token mean would weight units by their lengths
  and couple them through the shared denominator);
- clipping: per unit (a global norm would scale every unit by the largest one);
- AdamW over the stacked (k, ...) parameters is elementwise, so slice i only ever sees unit i's gradient.
Two things break bit-equality: LoRA dropout (drawn from the global RNG, on padded shapes; 0 in the equality test)
and float32 rounding: a batch padded to another width sums the same numbers in another order (~1e-7 relative), and
Adam's g/√v amplifies that on near-zero gradient entries (measured on tiny T5: 1.6e-5 max after 6 steps).
`pad_to_multiple_of` (fixed widths) removes the second: then batched and alone agree to ~1e-8.

Layout (PEFT's, ARCHITECTURE.md): per module type A (k, n_layers, r, d_in), B (k, n_layers, d_out, r).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import EncodedPair, assemble
from ..modeling.label_logits import model_label_logits
from ..errors import ConfigError, DataError
from ..io_utils import atomic_path, torch_save
from ..kernels import dispatch
from ..modeling.backbone import TargetSpec
from ..modeling.lora import BatchedLoraHooks
from ..run.signals import Stopped
from .optim import adamw
from .schedule import make_lr_lambda

CKPT_FILE = "state.pt"


# ------------------------------------------------------------------------------------------------ data
class UnitStream:
    """A unit's own data order: seeded shuffles, one epoch after another; its state is checkpointable."""

    def __init__(self, n: int, key: str):
        if n < 1:
            raise DataError(f"teacher unit stream {key!r}: no training instances")
        self.n, self.key = n, key
        self.epoch, self.pos = 0, 0
        self._perm = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.key}:epoch{epoch}").shuffle(order)
        return order

    def take(self, m: int) -> list[int]:
        out = []
        while len(out) < m:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._shuffle(self.epoch)
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._shuffle(self.epoch)


# ------------------------------------------------------------------------------------------------ maths
def kaiming_uniform_bound(d_in: int) -> float:
    """PEFT's A init is nn.init.kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√d_in."""
    return 1.0 / math.sqrt(d_in)


def per_unit_loss(label_logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], row_unit: torch.Tensor,
                  n_units: int) -> torch.Tensor:
    """(n_units,) mean token cross-entropy of each unit's rows. label_logits: (M, V) logits at the label positions,
    (M,) targets, (M,) row index (`align_label_logits` / `model_label_logits`); row_unit (N,)."""
    lg, tg, rows = label_logits
    ce = F.cross_entropy(lg.float(), tg, reduction="none")  # (M,)
    unit = row_unit[rows]
    tot = torch.zeros(n_units, dtype=ce.dtype, device=ce.device).index_add(0, unit, ce)
    cnt = torch.zeros(n_units, dtype=ce.dtype, device=ce.device).index_add(0, unit, torch.ones_like(ce))
    return tot / cnt.clamp_min(1.0)


@torch.no_grad()
def clip_per_unit_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each unit's gradient (slice i along dim 0 of every param) to `max_norm`, as clip_grad_norm_ would for
    that unit alone (coef = max_norm / (norm + 1e-6), capped at 1). Returns the (k,) pre-clip norms."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (k,)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


# ------------------------------------------------------------------------------------------------ adapters
class StackedLora(nn.Module):
    """The trainable A/B of k units, per module type; unit i's A comes from generator seeded with seeds[i]."""

    def __init__(self, specs: Sequence[TargetSpec], r: int, seeds: Sequence[int]):
        super().__init__()
        self.types: list[str] = []
        shapes: dict[str, tuple[int, int, int]] = {}
        for s in specs:
            n, _, _ = shapes.get(s.module_type, (0, s.d_in, s.d_out))
            shapes[s.module_type] = (max(n, s.layer + 1), s.d_in, s.d_out)
        self.k, self.r = len(seeds), r
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for j, (mt, (n_layers, d_in, d_out)) in enumerate(shapes.items()):
            self.types.append(mt)
            a = torch.empty(self.k, n_layers, r, d_in)
            bound = kaiming_uniform_bound(d_in)
            for i, seed in enumerate(seeds):
                g = torch.Generator().manual_seed(int(seed) * 1000 + j)  # per unit and module type
                a[i].uniform_(-bound, bound, generator=g)
            self.A[str(j)] = nn.Parameter(a)
            self.B[str(j)] = nn.Parameter(torch.zeros(self.k, n_layers, d_out, r))

    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {mt: (self.A[str(j)], self.B[str(j)]) for j, mt in enumerate(self.types)}

    def unit(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Unit i's adapters as (A (n_layers, r, d_in), B (n_layers, d_out, r)): peft_io.write_peft_adapter's input."""
        return {mt: (a[i].detach(), b[i].detach()) for mt, (a, b) in self.adapters().items()}


class _DropoutLoraHook:
    """Training-time LoRA term with dropout on its input (PEFT: B(A(dropout(x)))): used only when dropout > 0."""

    def __init__(self, owner: "BatchedTeacherTrainer", spec: TargetSpec):
        self.owner, self.spec = owner, spec

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        state = self.owner._dropout_state
        if state is None:
            return None
        adapters, task_ids = state
        A, B = adapters[self.spec.module_type]
        x = F.dropout(inputs[0], self.owner.dropout, training=True)
        delta = dispatch.segmented_lora(x, A[:, self.spec.layer], B[:, self.spec.layer], task_ids,
                                        self.owner.scale, backend=self.owner.backend)
        return output + delta.to(output.dtype)


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class UnitSpec:
    """One teacher to train: its name, its training examples (tokenized), the seed of its data order and the seed
    of its LoRA A (None: the same; teacher.init=shared gives every unit one)."""

    name: str
    examples: list[EncodedPair]
    seed: int
    init_seed: Optional[int] = None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[list[float]] = field(default_factory=list)  # per unit, one per step
    stopped_by_budget: bool = False


class BatchedTeacherTrainer:
    """k LoRA teachers on one frozen backbone (see the module docstring). `train()` runs to `steps`, checkpointing
    every `checkpoint_every` steps to `ckpt_dir` (and resuming from it when `resume=True` and it matches `tag`)."""

    def __init__(self, backbone: nn.Module, arch: str, specs: Sequence[TargetSpec], units: Sequence[UnitSpec], *,
                 r: int, alpha: float, dropout: float = 0.0, lr: float, steps: int, batch_size: int,
                 warmup_steps: int, grad_clip: float = 1.0, weight_decay: float = 0.0, pad_id: int,
                 device: str | torch.device = "cpu", backend: str = "auto", pad_to_multiple_of: int = 1):
        if not units:
            raise ConfigError("BatchedTeacherTrainer needs at least one unit")
        if steps < 1 or batch_size < 1:
            raise ConfigError(f"teacher.steps and teacher.batch_size must be >= 1, got {steps} and {batch_size}")
        self.backbone, self.arch, self.specs = backbone, arch, list(specs)
        self.units = list(units)
        self.k = len(units)
        self.scale, self.dropout, self.backend = alpha / r, float(dropout), backend
        self.steps, self.batch_size, self.grad_clip = steps, batch_size, grad_clip
        self.pad_id, self.device = pad_id, torch.device(device)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.lora = StackedLora(self.specs, r, [u.seed if u.init_seed is None else u.init_seed for u in units]).to(self.device)
        self.params = list(self.lora.parameters())
        self.optimizer = adamw(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, make_lr_lambda(warmup_steps=warmup_steps, total_steps=steps, schedule="linear"))
        self.streams = [UnitStream(len(u.examples), f"teacher:{u.seed}:{u.name}") for u in units]
        self.step_count = 0
        self.losses: list[list[float]] = [[] for _ in units]
        self.hooks = BatchedLoraHooks(backbone, self.specs, self.scale, backend=backend)
        self._dropout_state = None
        self._dropout_handles = []
        if self.dropout > 0:
            # The plain hooks stay inactive during training; these add the dropout version of the same term.
            for spec in self.specs:
                self._dropout_handles.append(
                    backbone.get_submodule(spec.name).register_forward_hook(_DropoutLoraHook(self, spec)))

    # -------------------------------------------------------------------------------- one step
    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every unit's next `batch_size` examples, rows grouped by unit; (tensors, row_unit (N,))."""
        pairs: list[EncodedPair] = []
        row_unit: list[int] = []
        for i, (u, s) in enumerate(zip(self.units, self.streams)):
            pairs += [u.examples[j] for j in s.take(self.batch_size)]
            row_unit += [i] * self.batch_size
        return (assemble(pairs, self.arch, self.pad_id, self.pad_to_multiple_of),
                torch.tensor(row_unit, dtype=torch.long))

    def label_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's label logits (flat, `model_label_logits`: a causal LM head over the label window only)."""
        return model_label_logits(self.backbone, self.arch == "llama", batch["input_ids"].to(self.device),
                                  batch["attention_mask"].to(self.device), batch["labels"].to(self.device))

    def train_step(self) -> list[float]:
        batch, row_unit = self.next_batch()
        row_unit = row_unit.to(self.device)
        adapters = self.lora.adapters()
        # Backward runs INSIDE the active hooks: with activation checkpointing the backbone's blocks are recomputed
        # during backward, and a recompute outside `apply` would silently drop the LoRA term.
        if self.dropout > 0:
            self._dropout_state = (adapters, row_unit)
            try:
                losses = per_unit_loss(self.label_logits(batch), row_unit, self.k)
                losses.sum().backward()  # Σ of per-unit means: unit i's params get exactly d(loss_i)
            finally:
                self._dropout_state = None
        else:
            with self.hooks.apply(adapters, row_unit):
                losses = per_unit_loss(self.label_logits(batch), row_unit, self.k)
                losses.sum().backward()  # Σ of per-unit means: unit i's params get exactly d(loss_i)
        if self.grad_clip and self.grad_clip > 0:
            clip_per_unit_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        vals = [float(v) for v in losses.detach().cpu()]
        for i, v in enumerate(vals):
            self.losses[i].append(v)
        return vals

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self, tag: dict) -> dict:
        state = {"tag": tag, "step": self.step_count, "lora": {k: v.detach().cpu() for k, v in
                                                                self.lora.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "streams": [s.state_dict() for s in self.streams], "losses": self.losses,
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.lora.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        self.losses = [list(x) for x in state["losses"]]
        self.step_count = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self, ckpt_dir: Path, tag: dict) -> Path:
        """Atomic: a kill mid-save leaves the previous checkpoint intact."""
        path = Path(ckpt_dir) / CKPT_FILE
        with atomic_path(path) as tmp:
            torch_save(self.state_dict(tag), tmp)  # tensors and plain values: try_resume reads it weights_only
        return path

    def try_resume(self, ckpt_dir: Path, tag: dict, log: Callable[[str], None] = print) -> bool:
        """Load `ckpt_dir`'s checkpoint when it was written for this very `tag` (units + configuration hashes)."""
        path = Path(ckpt_dir) / CKPT_FILE
        if not path.is_file():
            return False
        try:
            # weights_only: tensors and plain values only, so a pickle planted in the run folder never runs
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file: start over rather than fail (it is replaced)
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            log(f"teacher: ignoring checkpoint {path}: not a checkpoint of ours, or damaged ({msg}); starting over")
            return False
        if state.get("tag") != tag:
            log(f"teacher: checkpoint {path} was written for another configuration; starting over")
            return False
        self.load_state_dict(state)
        log(f"teacher: resumed {', '.join(u.name for u in self.units)} from {path} at step {self.step_count}")
        return True

    # -------------------------------------------------------------------------------- loop
    def train(self, *, ckpt_dir: Optional[Path] = None, tag: Optional[dict] = None, checkpoint_every: int = 0,
              time_budget_s: Optional[float] = None, on_step: Optional[Callable[[int, list[float]], None]] = None,
              stop: Optional[Callable[[], bool]] = None) -> TrainResult:
        """Train to `steps`. `stop()` is asked after every step: when it says so, the batch is checkpointed (when
        `ckpt_dir` is given) and run.signals.Stopped is raised; a rerun resumes there."""
        t0 = time.perf_counter()
        budget_hit = False
        # transformers recomputes checkpointed blocks only in train() mode; otherwise keep the backbone's dropout off
        ckpt_on = getattr(self.backbone, "is_activation_checkpointing", None)
        if ckpt_on is None:
            ckpt_on = getattr(self.backbone, "is_gradient_checkpointing", False)
        self.backbone.train(bool(ckpt_on))
        while self.step_count < self.steps:
            if time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s:
                budget_hit = True
                break
            vals = self.train_step()
            if on_step is not None:
                on_step(self.step_count, vals)
            if ckpt_dir is not None and checkpoint_every > 0 and self.step_count % checkpoint_every == 0 \
                    and self.step_count < self.steps:
                self.save_checkpoint(ckpt_dir, tag or {})
            if stop is not None and self.step_count < self.steps and stop():
                where = self.save_checkpoint(ckpt_dir, tag or {}) if ckpt_dir is not None else None
                self.backbone.eval()
                raise Stopped(f"teacher {', '.join(u.name for u in self.units)}: stopped at step {self.step_count}"
                              f"{f'; checkpoint {where}' if where else ''}; rerun the same command to resume")
        self.backbone.eval()
        return TrainResult(self.step_count, time.perf_counter() - t0, self.losses, budget_hit)

    def close(self) -> None:
        """Detach every hook from the backbone (it can be reused for another batch of units)."""
        self.hooks.remove()
        for h in self._dropout_handles:
            h.remove()
        self._dropout_handles.clear()
