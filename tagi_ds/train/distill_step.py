"""The finetune's loss: L = CE + λ_kl·KL_T(teacher‖student) + λ_ins·L_ins, token-weighted, for one micro batch.

- CE: the student's token cross-entropy on the instance targets.
- KL: T²·KL at temperature T against the teacher's top-k read from the logit cache (`CachedTeacherSignal`,
  `cache.missing_mass`), or, with `finetune.online_teacher`, against the teacher's full distribution computed live
  (backbone + the teacher's LoRA through the student's own hooks, full Tk-Instruct prompt, no grad).
- L_ins: per task, the mean over target modules of ‖ΔW_gen − ΔW_teacher‖²_F / ‖ΔW_teacher‖²_F (`delta_w_distance`);
  teacher adapters are read ahead of their step from their PEFT folders (TeacherAdapters) into an LRU bounded in bytes.
A zero weight switches a term off: never computed, never logged. Every term is a sum over label tokens (L_ins: each
task's value weighted by its label tokens); the loop divides by the global token count.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from ..distill.l_ins import l_ins_per_task
from ..distill.losses import distillation_loss, signal_kl, teacher_kl
from ..distill.signal import DenseTeacher
from ..modeling.label_logits import label_positions
from ..modeling.tagi import TagiStudent, TaskEncoding
from ..run.peft_io import read_peft_adapter
from .losses import ce_sum, student_label_logits

class TeacherAdapters:
    """Each task's teacher adapter (A, B per module type) and scale, read AHEAD of the step that needs it by one
    background thread (`prefetch`: file reads and checksums release the GIL), kept in an LRU bounded in BYTES (a
    T5-XL teacher is ~75 MB: a count bound says nothing about memory). `get` waits only when a read is late."""

    def __init__(self, teacher_dir_of: Callable[[str], Path], specs, max_bytes: int,
                 also: Optional[Callable[[str], None]] = None, adapters: bool = True):
        self.dir_of, self.specs, self.max_bytes = teacher_dir_of, specs, int(max_bytes)
        self.also = also  # more read-ahead per task (the logit-cache shard's open + checksum)
        self.adapters = adapters  # False: only `also` is read ahead (a KL-only finetune never reads the adapters)
        self._cache: OrderedDict[str, tuple[dict, float, int]] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-prefetch")
        self.stats = {"reads": 0, "hits": 0, "waited_s": 0.0}

    def _load(self, task_name: str) -> tuple[dict, float, int]:
        if self.also is not None:
            self.also(task_name)
        if not self.adapters:
            return {}, 0.0, 0
        adapters, scale, _ = read_peft_adapter(self.dir_of(task_name), self.specs)
        size = sum(t.numel() * t.element_size() for pair in adapters.values() for t in pair)
        return adapters, scale, size

    def prefetch(self, task_names) -> None:
        with self._lock:
            for name in task_names:
                if name not in self._cache and name not in self._pending:
                    self._pending[name] = self._pool.submit(self._load, name)

    def get(self, task_name: str) -> tuple[dict, float]:
        """(adapters {module_type: (A (L, r, d_in), B (L, d_out, r))}, scale) of a task's teacher."""
        with self._lock:
            hit = self._cache.get(task_name)
            fut = self._pending.pop(task_name, None) if hit is None else None
        if hit is not None:
            self.stats["hits"] += 1
        else:
            t0 = time.perf_counter()
            hit = fut.result() if fut is not None else self._load(task_name)
            self.stats["reads"] += 1
            self.stats["waited_s"] += time.perf_counter() - t0
        with self._lock:
            self._cache[task_name] = hit
            self._cache.move_to_end(task_name)
            total = sum(size for _, _, size in self._cache.values())
            while total > self.max_bytes and len(self._cache) > 1:
                _, (_, _, size) = self._cache.popitem(last=False)
                total -= size
        return hit[0], hit[1]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def hooked_label_logits(student: TagiStudent, adapters: dict, task_ids: torch.Tensor, full) -> torch.Tensor:
    """Logits (N, L, V) at the label positions of a full-prompt batch, from the student's backbone with `adapters`
    (rows' LoRA by `task_ids`, B already scaled to the student's lora scale) added by the student's own hooks."""
    bb = student.backbone
    with student.hooks.apply(adapters, task_ids):
        if student.arch == "t5":
            out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask,
                     decoder_input_ids=bb._shift_right(full.labels), use_cache=False)
        else:
            out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask, use_cache=False)
    logits, _, _ = label_positions(out.logits, full.labels, student.arch)
    return logits


class DistillLoss:
    """The loss callable the loop runs inside the engine's forward (see the module docstring)."""

    def __init__(self, *, lambda_kl: float, lambda_ins: float, temperature: float, online_teacher: bool, signal,
                 teachers: Optional[TeacherAdapters], kl_options: Optional[dict] = None):
        self.lambda_kl, self.lambda_ins, self.temperature = lambda_kl, lambda_ins, temperature
        self.online_teacher, self.signal, self.teachers = online_teacher, signal, teachers
        self.kl_options = kl_options or {}  # the cache mode's estimator settings (missing_mass, estimator, control)

    def __call__(self, student: TagiStudent, encoding: TaskEncoding, batch):
        adapters = student.generate_adapters(encoding)  # reused by L_ins
        logits, targets, mask = student_label_logits(student, encoding, batch, adapters)
        ce, n = ce_sum(logits, targets, mask)
        total, terms = distillation_loss(
            ce, lambda: self.kl_sum(student, batch, logits, mask),
            lambda: self.l_ins_sum(student, batch, adapters, mask), self.lambda_kl, self.lambda_ins)
        return total, n, terms

    def kl_sum(self, student: TagiStudent, batch, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ over label tokens of T²·KL_T(teacher ‖ student): one call for the whole micro batch, whatever the
        teacher's source (the cache, any mode, or the live teacher as a DenseTeacher): `signal_kl` picks the loss."""
        if self.online_teacher:
            teacher = DenseTeacher.of(self.online_teacher_logits(student, batch), mask)  # (N, L, V), same layout
            return signal_kl(logits, mask, teacher, self.temperature).float() * mask.sum()
        row_tasks = [batch.task_names[j] for j in batch.task_ids.tolist()]
        kl = teacher_kl(logits, mask, self.signal, row_tasks, batch.instance_ids, self.temperature, **self.kl_options)
        return kl.float() * mask.sum()

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
        return hooked_label_logits(student, stacked, full.task_ids, full)

    def l_ins_sum(self, student: TagiStudent, batch, adapters: dict, mask: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's tasks of (label tokens of the task) × mean over target modules of the normalised
        ‖ΔW_gen − ΔW_teacher‖²."""
        tokens = torch.bincount(batch.task_ids, weights=mask.sum(-1).float(), minlength=len(batch.task_names))
        teachers = [self.teachers.get(name) for name in batch.task_names]
        return (l_ins_per_task(adapters, student.lora_scale, teachers) * tokens.to(mask.device)).sum()
