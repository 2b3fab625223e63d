"""The finetune's loss: L = CE + λ_kl·KL_T(teacher‖student) + λ_ins·L_ins, token-weighted, for one micro batch.

- CE: the student's token cross-entropy on the instance targets.
- KL: T²·KL at temperature T against the teacher's top-k read from the logit cache (`CachedTeacherSignal`,
  `cache.missing_mass`), or, with `finetune.online_teacher`, against the teacher's full distribution computed live
  (backbone + the teacher's LoRA through the student's own hooks, full Tk-Instruct prompt, no grad).
- L_ins: per task, the mean over target modules of ‖ΔW_gen − ΔW_teacher‖²_F / ‖ΔW_teacher‖²_F (`delta_w_distance`);
  teacher adapters are read lazily per task from their PEFT folders (memory-mapped) and kept in a small LRU.
A zero weight switches a term off: never computed, never logged. Every term is a sum over label tokens (L_ins: each
task's value weighted by its label tokens); the loop divides by the global token count.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

from ..distill.l_ins import delta_w_distance
from ..distill.losses import distillation_loss, teacher_kl
from ..distill.sparse_kl import dense_kl
from ..errors import ArtifactMismatchError
from ..modeling.label_logits import label_positions
from ..modeling.tagi import TagiStudent, TaskEncoding
from ..run.peft_io import read_peft_adapter
from .losses import ce_sum, student_logits

TEACHER_CACHE_SIZE = 64  # teacher adapters kept in memory (read lazily, memory-mapped)


class TeacherAdapters:
    """Each task's teacher adapter (A, B per module type) and scale, read on first use, least recently used dropped."""

    def __init__(self, teacher_dir_of: Callable[[str], Path], specs, size: int = TEACHER_CACHE_SIZE):
        self.dir_of, self.specs, self.size = teacher_dir_of, specs, size
        self._cache: OrderedDict[str, tuple[dict, float]] = OrderedDict()

    def get(self, task_name: str) -> tuple[dict, float]:
        """(adapters {module_type: (A (L, r, d_in), B (L, d_out, r))}, scale) of a task's teacher."""
        if task_name not in self._cache:
            adapters, scale, _ = read_peft_adapter(self.dir_of(task_name), self.specs)
            self._cache[task_name] = (adapters, scale)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(task_name)
        return self._cache[task_name]


class DistillLoss:
    """The loss callable the loop runs inside the engine's forward (see the module docstring)."""

    def __init__(self, *, lambda_kl: float, lambda_ins: float, temperature: float, missing_mass: str,
                 online_teacher: bool, signal, teachers: Optional[TeacherAdapters]):
        self.lambda_kl, self.lambda_ins, self.temperature = lambda_kl, lambda_ins, temperature
        self.missing_mass, self.online_teacher = missing_mass, online_teacher
        self.signal, self.teachers = signal, teachers

    def __call__(self, student: TagiStudent, encoding: TaskEncoding, batch):
        adapters = student.generate_adapters(encoding)  # reused by L_ins
        logits, targets, mask = label_positions(student_logits(student, encoding, batch, adapters), batch.labels,
                                                student.arch)
        ce, n = ce_sum(logits, targets, mask)
        total, terms = distillation_loss(
            ce, lambda: self.kl_sum(student, batch, logits, mask),
            lambda: self.l_ins_sum(student, batch, adapters, mask), self.lambda_kl, self.lambda_ins)
        return total, n, terms

    def kl_sum(self, student: TagiStudent, batch, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ over label tokens of T²·KL_T(teacher ‖ student) (a token mean × tokens, per task)."""
        if self.online_teacher:
            t_logits = self.online_teacher_logits(student, batch)  # (N, L, V), same label layout
            if t_logits.shape[:2] != logits.shape[:2]:
                raise ArtifactMismatchError(f"online teacher: label positions {tuple(t_logits.shape[:2])} differ "
                                            f"from the student's {tuple(logits.shape[:2])}")
            return dense_kl(logits, t_logits, mask, self.temperature) * mask.sum()
        total = logits.new_zeros((), dtype=torch.float32)
        for j, name in enumerate(batch.task_names):
            rows = (batch.task_ids == j).nonzero().squeeze(-1)
            m = mask.index_select(0, rows)
            ids = [batch.instance_ids[i] for i in rows.tolist()]
            kl = teacher_kl(logits.index_select(0, rows), m, self.signal, name, ids, self.temperature,
                            missing_mass=self.missing_mass)
            total = total + kl.float() * m.sum()
        return total

    @torch.no_grad()
    def online_teacher_logits(self, student: TagiStudent, batch) -> torch.Tensor:
        """The teachers' logits at the label positions of the full-prompt batch: the backbone with each row's
        teacher LoRA added by the student's own hooks (B scaled by s_teacher / s_student)."""
        full = batch.extra
        dev = full.input_ids.device
        dtype = next(student.hypernet.parameters()).dtype
        per_task = [self.teachers.get(name) for name in full.task_names]
        stacked = {}
        for mt in per_task[0][0]:
            A = torch.stack([a[mt][0] for a, _ in per_task]).to(dev, dtype)
            B = torch.stack([a[mt][1] * (s / student.lora_scale) for a, s in per_task]).to(dev, dtype)
            stacked[mt] = (A, B)
        bb = student.backbone
        with student.hooks.apply(stacked, full.task_ids):
            if student.arch == "t5":
                out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask,
                         decoder_input_ids=bb._shift_right(full.labels), use_cache=False)
            else:
                out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask, use_cache=False)
        logits, _, _ = label_positions(out.logits, full.labels, student.arch)
        return logits

    def l_ins_sum(self, student: TagiStudent, batch, adapters: dict, mask: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's tasks of (label tokens of the task) × mean over target modules of the normalised
        ‖ΔW_gen − ΔW_teacher‖²."""
        tokens = torch.bincount(batch.task_ids, weights=mask.sum(-1).float(), minlength=len(batch.task_names))
        total = None
        for j, name in enumerate(batch.task_names):
            t_adapters, s_t = self.teachers.get(name)
            dists = []
            for mt, (A_g, B_g) in adapters.items():
                A_t, B_t = (x.to(A_g.device) for x in t_adapters[mt])
                dists.append(delta_w_distance(A_g[j], B_g[j], student.lora_scale, A_t, B_t, s_t))  # (L,)
            value = torch.cat(dists).float().mean() * tokens[j]
            total = value if total is None else total + value
        return total
