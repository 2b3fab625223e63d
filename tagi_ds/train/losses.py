"""The student's token losses as pure functions over a batch: logits at the label positions, summed cross-entropy
and the token count (the loop divides by the global token count). Pretrain's whole loss is `ce_loss`; the finetune
adds its distillation terms to the same CE (train/distill_step.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.label_logits import IGNORE, causal_label_window, label_positions
from ..modeling.tagi import TagiStudent, TaskEncoding


def student_label_logits(student: TagiStudent, encoding: TaskEncoding, batch, adapters=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's logits at the label positions of a TrainBatch, left-aligned per row (`label_positions`):
    (logits (N, Lt, V), targets (N, Lt), mask (N, Lt)). No loss inside: the stages sum token losses themselves.

    LLaMA: the LM head runs over the window of positions that predict a label in some row (`logits_to_keep`), not
    the whole prompt + target: the full (N, L, V) logits and the gradients of their gather were a step's largest
    tensors (the baselines' measured 2.87 GiB, train/baselines.causal_label_logits)."""
    if student.arch == "t5":
        out = student(encoding, batch.task_ids, batch.input_ids, batch.attention_mask, labels=None,
                      decoder_input_ids=student.backbone._shift_right(batch.labels), adapters=adapters)
        return label_positions(out.logits, batch.labels, "t5")
    first, last = causal_label_window(batch.labels)
    keep = torch.arange(first, last + 1, device=batch.input_ids.device)  # [first, last]: the last predicts nothing
    out = student(encoding, batch.task_ids, batch.input_ids, batch.attention_mask, labels=None, adapters=adapters,
                  logits_to_keep=keep)
    return label_positions(out.logits, batch.labels[:, first:last + 1], "llama")


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy in float32, token count) over mask. logits (N, L, V), targets/mask (N, L)."""
    tgt = targets.masked_fill(~mask, IGNORE)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, mask.sum()


def ce_loss(student: TagiStudent, encoding: TaskEncoding, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(Σ token CE, token count, {"ce"}) of the batch's targets."""
    logits, targets, mask = student_label_logits(student, encoding, batch)
    ce, n = ce_sum(logits, targets, mask)
    return ce, n, {"ce": ce.detach()}
