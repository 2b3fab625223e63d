"""What the hypernetwork stages (pretrain, finetune) put on the engine loop (engine_stage.py): the student built
on the set-up backbone, its micro batch, its step module and its export.

Every structure is O(micro batch): each micro batch encodes its own tasks' instructions (one frozen forward per micro
batch on every rank, so ZeRO-3's parameter gathers stay in lock-step), padded to an 8-token bucket, never to the
longest instruction of the run.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import LoopConfig
from ..data.collate import INSTRUCTION_BUCKET, bucket_width
from ..modeling.encoding_cache import EncodingCache
from ..modeling.tagi import TagiStudent, TaskEncoding, build_student
from ..run.export_io import export_config
from ..run.paths import EXPORT_SUBDIR
from .checkpoint import export_trainable
from .engine import seed_everything
from .engine_stage import EngineSetup, StageSpec, setup_backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainBatch:
    """One micro batch of one rank. Tasks are the batch's own (n_tasks); `task_index` maps them to the stage's
    task list (rows of the precomputed encodings)."""

    task_index: torch.Tensor  # (n_tasks,) long
    task_ids: torch.Tensor  # (N,) long, row → batch task
    input_ids: torch.Tensor  # (N, Lx)
    attention_mask: torch.Tensor  # (N, Lx)
    labels: torch.Tensor  # (N, Ly) T5 / (N, Lx) causal, IGNORE outside the target
    instr_ids: torch.Tensor  # (n_tasks, Li): only read when the instruction encoder trains
    instr_mask: torch.Tensor  # (n_tasks, Li)
    task_names: list[str]
    instance_ids: list[str]
    extra: Any = None  # stage-specific (finetune: the full-prompt batch of the online teacher)

    def to(self, device) -> "TrainBatch":
        for fl in fields(self):
            v = getattr(self, fl.name)
            if isinstance(v, torch.Tensor) or (hasattr(v, "to") and not isinstance(v, (str, list))):
                setattr(self, fl.name, v.to(device))
        return self


LossFn = Callable[[TagiStudent, TaskEncoding, TrainBatch], "tuple[torch.Tensor, torch.Tensor, dict]"]


def bucket_instructions(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_tasks, Li) rows right-padded to the next multiple of collate.INSTRUCTION_BUCKET (the micro batch's own
    longest, never the run's): a bounded set of shapes over a run, and no batch pays the longest task."""
    width = bucket_width(ids.shape[1], INSTRUCTION_BUCKET)
    extra = width - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.nn.functional.pad(ids, (0, extra), value=pad), torch.nn.functional.pad(mask, (0, extra), value=0))


@dataclass
class StudentSetup(EngineSetup):
    """The engine setup plus the TAGI student built on its backbone."""

    student: Optional[TagiStudent] = None
    r: int = 0
    alpha: float = 0.0


def head_lr_scale_of(hcfg) -> Callable[[str], float]:
    """Per-parameter lr multiplier: `hypernet.head_lr_scale` (None = 1/sqrt(hidden)) on the heads' weight matrices,
    1 elsewhere (see the config field's help for why)."""
    scale = hcfg.head_lr_scale if hcfg.head_lr_scale is not None else hcfg.hidden ** -0.5
    return lambda name: scale if "head_weight" in name.split(".") else 1.0


def config_student(cfg, backbone: nn.Module, arch: str, backend: Optional[str] = None
                   ) -> tuple[TagiStudent, int, float]:
    """(the student the config describes around `backbone`, its generated rank r, its alpha); `backend` overrides
    hypernet.kernel."""
    h, r, alpha = cfg.hypernet, cfg.generated_rank, cfg.generated_alpha
    student = build_student(backbone, arch, cfg.backbone.target_modules, r, alpha, hidden=h.hidden,
                            trunk_layers=h.trunk_layers, embed_dim=h.embed_dim, fusion=h.fusion,
                            train_encoder=h.train_encoder, backend=backend or h.kernel)
    return student, r, alpha


def setup_student(cfg, *, micro_batch: int, loop: LoopConfig) -> StudentSetup:
    """The engine setup, then a freshly seeded student on its backbone (ours activation checkpointing: the recompute
    keeps the LoRA terms and the LLaMA prefix)."""
    base = setup_backbone(cfg, micro_batch=micro_batch, loop=loop)
    seed_everything(cfg.seed)  # the hypernetwork's init must not depend on what loading the backbone drew
    b = cfg.backbone
    student, r, alpha = config_student(cfg, base.backbone, base.arch)
    student.hypernet.to(DTYPES[b.dtype])  # the engine must not mix dtypes (DEEPSPEED_CPU.md pitfall 4)
    if b.gradient_checkpointing:
        student.enable_activation_checkpointing()
    return StudentSetup(**{f.name: getattr(base, f.name) for f in fields(EngineSetup)}, student=student, r=r,
                        alpha=alpha)


class StudentStep(nn.Module):
    """What the engine wraps for a hypernetwork stage: the student (trainable hypernetwork, frozen backbone) and the
    stage's loss. The micro batch's own instructions are encoded here (no grad unless the instruction encoder
    trains)."""

    def __init__(self, student: TagiStudent, loss: LossFn, encoding_cache_bytes: int = 0):
        super().__init__()
        self.student = student
        self.loss = loss
        # > 0: instruction encodings kept across steps in an LRU of this many bytes (modeling/encoding_cache.py):
        # the finetune's tasks recur every few steps; the pretrain's instructions are text segments and never do
        self.encodings = EncodingCache(encoding_cache_bytes)

    def forward(self, batch: TrainBatch):
        encoding = self.encodings.encode(self.student, batch.instr_ids, batch.instr_mask)
        return self.loss(self.student, encoding, batch)


def hypernet_stage(setup: StudentSetup, *, name: str, out_dir: Path, tb_dir: Path, loop: LoopConfig,
                   record: Optional[dict], batches: Any, loss: LossFn, variant: Optional[str] = None,
                   summary: Optional[dict] = None, close: Optional[Callable[[dict], None]] = None,
                   encoding_cache_bytes: int = 0) -> StageSpec:
    """A hypernetwork stage's description: its step module, and the export of the hypernetwork alone.
    encoding_cache_bytes > 0: the step keeps instruction encodings across steps (StudentStep)."""
    cfg = setup.cfg

    def export(module: nn.Module, step: int) -> Optional[Path]:
        conf = export_config(module.student, backbone_id=setup.backbone_path, target_kinds=cfg.backbone.target_modules,
                             r=setup.r, alpha=setup.alpha, dtype=cfg.backbone.dtype, tokenizer=cfg.backbone.tokenizer,
                             stage=name, variant=variant, step=step)
        return export_trainable(out_dir / EXPORT_SUBDIR, module.student, conf)

    encoding = (f"cached across steps (LRU of {encoding_cache_bytes} bytes)" if encoding_cache_bytes > 0
                else "per micro batch")
    return StageSpec(name, out_dir, tb_dir, loop, record, batches,
                     StudentStep(setup.student, loss, encoding_cache_bytes), export, variant=variant,
                     summary={"instruction_encoding": encoding, **(summary or {})},
                     close=close, lr_scale_of=head_lr_scale_of(cfg.hypernet))
