"""The student's token losses as pure functions over a batch: logits at the label positions, summed cross-entropy
and the token count (the loop divides by the global token count). Pretrain's whole loss is `ce_loss`; the finetune
adds its distillation terms to the same CE (train/distill_step.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.label_logits import IGNORE, label_positions
from ..modeling.tagi import TagiStudent, TaskEncoding


def student_logits(student: TagiStudent, encoding: TaskEncoding, batch, adapters=None) -> torch.Tensor:
    """The student's logits for a TrainBatch (no loss inside: the stages sum token losses themselves)."""
    dec = student.backbone._shift_right(batch.labels) if student.arch == "t5" else None
    out = student(encoding, batch.task_ids, batch.input_ids, batch.attention_mask, labels=None,
                  decoder_input_ids=dec, adapters=adapters)
    return out.logits


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy in float32, token count) over mask. logits (N, L, V), targets/mask (N, L)."""
    tgt = targets.masked_fill(~mask, IGNORE)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, mask.sum()


def ce_loss(student: TagiStudent, encoding: TaskEncoding, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(Σ token CE, token count, {"ce"}) of the batch's targets."""
    logits, targets, mask = label_positions(student_logits(student, encoding, batch), batch.labels, student.arch)
    ce, n = ce_sum(logits, targets, mask)
    return ce, n, {"ce": ce.detach()}
