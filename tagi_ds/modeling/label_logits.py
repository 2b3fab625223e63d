"""Which logits predict which label tokens, for T5 (decoder position j predicts label j) and causal models (position
t predicts token t+1), in the two shapes the code needs: flat (teacher training, cache writing, held-back loss) and
left-aligned per row (the student's losses, matching the cache's per-instance order).
"""
from __future__ import annotations

import torch

IGNORE = -100  # label value the losses skip (data.collate.IGNORE)


def align_label_logits(logits: torch.Tensor, labels: torch.Tensor, causal: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at label positions: (M, V) logits, (M,) target ids, (M,) row index, rows in order, positions in
    order within a row. T5: logits[:, j] predicts labels[:, j]; causal: logits[:, t] predicts labels[:, t+1]."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != IGNORE  # (N, L)
    rows = valid.nonzero()[:, 0]  # (M,) row-major order
    return logits[valid], labels[valid], rows


def label_positions(logits: torch.Tensor, labels: torch.Tensor, arch: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each label token, left-aligned per row: (logits (N, L, V), targets (N, L), mask (N, L)).

    T5: labels (N, Ly) are already target + eos right-padded with IGNORE. Causal: logits[t] predicts input[t+1];
    the target tokens of a row are contiguous (prompt, target, padding), so row i's label logits start one before
    its first label. Left alignment is what the teacher top-k (stored per label position) expects.
    """
    if arch == "t5":
        mask = labels != IGNORE
        return logits, labels.masked_fill(~mask, 0), mask
    shifted = labels[:, 1:]  # (N, Lx-1): the token each logits[:, :-1] position predicts
    valid = shifted != IGNORE
    lengths = valid.sum(dim=1)  # (N,)
    first = torch.where(lengths > 0, valid.float().argmax(dim=1), torch.zeros_like(lengths))  # (N,)
    L = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    offs = torch.arange(L, device=labels.device)[None, :]  # (1, L)
    mask = offs < lengths[:, None]  # (N, L)
    idx = (first[:, None] + offs).clamp_max(shifted.shape[1] - 1)  # (N, L)
    lab = shifted.gather(1, idx).masked_fill(~mask, 0)
    gathered = logits[:, :-1].gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))  # (N, L, V)
    return gathered, lab, mask
