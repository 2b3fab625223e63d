"""Thin wrappers the finetune recipe calls: the weighted sum of CE, KL and L_ins, and the KL from a teacher signal.

The maths lives in pure functions (sparse_kl.py, sampled_kl.py, l_ins.py); here only weighting and plumbing. A term whose weight is
zero is never computed (pass it as a zero-argument callable) and never appears in the returned terms.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable, Sequence, Union

import torch

from ..errors import ArtifactMismatchError
from .sampled_kl import Control, weighted_kl
from .signal import DenseTeacher, PriorityTeacher, SampledTeacher, TeacherBatch, TeacherSignal, TopKTeacher
from .sparse_kl import MissingMass, dense_kl, sparse_kl

Term = Union[torch.Tensor, Callable[[], torch.Tensor], None]


def _resolve(name: str, term: Term, weight: float) -> torch.Tensor | None:
    if weight == 0:
        return None  # removed completely: a callable is not even called
    if term is None:
        raise ValueError(f"distillation_loss: lambda_{name}={weight} but no {name} term was given")
    return term() if callable(term) else term


def distillation_loss(ce: torch.Tensor, kl: Term, l_ins: Term, lambda_kl: float,
                      lambda_ins: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = ce + λ_kl·kl + λ_ins·l_ins. `kl` / `l_ins` may be tensors or zero-argument callables (computed only
    when their weight is non-zero). Returns (total, {"ce", ["kl"], ["l_ins"]}: detached values for logging)."""
    total = ce
    terms = {"ce": ce.detach()}
    for name, term, weight in (("kl", kl, lambda_kl), ("l_ins", l_ins, lambda_ins)):
        value = _resolve(name, term, weight)
        if value is not None:
            total = total + weight * value
            terms[name] = value.detach()
    return total, terms


def signal_kl(student_logits: torch.Tensor, label_mask: torch.Tensor, teacher: TeacherBatch, temperature: float,
              missing_mass: MissingMass = "bucket", estimator: str = "distinct", control: Control = "auto",
              chunk_tokens: int = 1024) -> torch.Tensor:
    """T^2 * mean over label tokens of KL_T(teacher || student), by the loss that fits the teacher batch's kind:
    top-k -> `sparse_kl` (`missing_mass`: biased, see sparse_kl.py); sampled -> `weighted_kl` with `estimator`
    ("counts" | "distinct") weights and priority -> `weighted_kl` with max(p, tau) weights (both unbiased in value
    and gradient, see sampled_kl.py); dense -> `dense_kl` (exact).

    student_logits (N, L, V) and label_mask (N, L) as in `teacher_kl`; the teacher batch must cover the same
    positions (`teacher.valid == label_mask`).
    """
    if not torch.equal(teacher.valid.to(label_mask.device), label_mask.bool()):
        raise ArtifactMismatchError("teacher_kl: the teacher's label positions disagree with the batch's")
    dev = student_logits.device
    t = teacher.to(dev)
    mask = label_mask.to(dev).bool()
    if isinstance(t, TopKTeacher):
        return sparse_kl(student_logits, t.logprobs, t.ids, mask, temperature, missing_mass=missing_mass,
                         chunk_tokens=chunk_tokens)
    if isinstance(t, SampledTeacher):
        return weighted_kl(student_logits, t.logprobs, t.ids, t.weights(estimator), mask, temperature, control,
                           chunk_tokens)
    if isinstance(t, PriorityTeacher):
        return weighted_kl(student_logits, t.logprobs, t.ids, t.weights(), mask, temperature, control, chunk_tokens)
    if isinstance(t, DenseTeacher):
        return dense_kl(student_logits, t.logits, mask, temperature)
    raise TypeError(f"signal_kl: unknown teacher batch {type(teacher).__name__}")


def teacher_kl(student_logits: torch.Tensor, label_mask: torch.Tensor, signal: TeacherSignal,
               task_name: str | Sequence[str], instance_ids: Sequence[str], temperature: float,
               missing_mass: MissingMass = "bucket", chunk_tokens: int = 1024,
               estimator: str = "distinct", control: Control = "auto") -> torch.Tensor:
    """KL_T(teacher || student) for a micro batch, the teacher read from `signal` (any cache mode).

    student_logits (N, L, V) at label positions, left-aligned: row i's label tokens are at 0..len_i-1, which is what
    `label_mask` (N, L) bool must say (a prefix mask). `task_name`: the task of every row, or one per row (a batch of
    several tasks in one call). The signal returns the teacher for the same positions; `signal_kl` picks the loss.
    """
    N, L, _ = student_logits.shape
    lengths = label_mask.sum(-1)  # (N,)
    prefix = torch.arange(L, device=label_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, label_mask.bool()):
        raise ValueError("teacher_kl: label_mask must be left-aligned (True at 0..len-1 in each row)")
    names = [task_name] * N if isinstance(task_name, str) else list(task_name)
    teacher = signal.batch(names, list(instance_ids), [int(x) for x in lengths.tolist()])
    teacher = _pad_to(teacher, L)
    if not torch.equal(teacher.valid.to(label_mask.device), label_mask.bool()):
        raise ArtifactMismatchError(f"teacher_kl: task {task_name}: cached label positions disagree with the batch")
    return signal_kl(student_logits, label_mask, teacher, temperature, missing_mass=missing_mass,
                     estimator=estimator, control=control, chunk_tokens=chunk_tokens)


def _pad_to(teacher: TeacherBatch, L: int) -> TeacherBatch:
    """Pad (or cut) the teacher's position axis to the student's padded length L."""
    have = teacher.valid.shape[1]
    if have == L:
        return teacher
    out = {}
    for f in fields(teacher):
        v = getattr(teacher, f.name)
        if isinstance(v, torch.Tensor):
            v = torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, max(L - have, 0)))[:, :L]
        out[f.name] = v
    return type(teacher)(**out)
