"""Thin wrappers the finetune recipe calls: the weighted sum of CE, KL and L_ins, and the KL from a teacher signal.

The maths lives in pure functions (sparse_kl.py, l_ins.py); here only weighting and plumbing. A term whose weight is
zero is never computed (pass it as a zero-argument callable) and never appears in the returned terms.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from ..errors import ArtifactMismatchError
from .signal import TeacherSignal
from .sparse_kl import MissingMass, sparse_kl

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


def teacher_kl(student_logits: torch.Tensor, label_mask: torch.Tensor, signal: TeacherSignal, task_name: str,
               instance_ids: Sequence[str], temperature: float, missing_mass: MissingMass = "bucket",
               chunk_tokens: int = 1024) -> torch.Tensor:
    """KL_T(teacher || student) for one task's micro batch, the teacher's top-k read from `signal`.

    student_logits (N, L, V) at label positions, left-aligned: row i's label tokens are at 0..len_i-1, which is what
    `label_mask` (N, L) bool must say (a prefix mask). The signal returns the teacher's top-k for the same positions.
    """
    N, L, _ = student_logits.shape
    lengths = label_mask.sum(-1)  # (N,)
    prefix = torch.arange(L, device=label_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, label_mask.bool()):
        raise ValueError("teacher_kl: label_mask must be left-aligned (True at 0..len-1 in each row)")
    lp, ids, valid = signal.topk(task_name, list(instance_ids), [int(x) for x in lengths.tolist()])
    if lp.shape[1] < L:  # pad the teacher side to the student's padded length
        pad = L - lp.shape[1]
        lp = torch.nn.functional.pad(lp, (0, 0, 0, pad))
        ids = torch.nn.functional.pad(ids, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    lp, ids, valid = lp[:, :L], ids[:, :L], valid[:, :L]
    if not torch.equal(valid.to(label_mask.device), label_mask.bool()):
        raise ArtifactMismatchError(f"teacher_kl: task {task_name}: cached label positions disagree with the batch")
    dev = student_logits.device
    return sparse_kl(student_logits, lp.to(dev), ids.to(dev), label_mask.to(dev).bool(), temperature,
                     missing_mass=missing_mass, chunk_tokens=chunk_tokens)
