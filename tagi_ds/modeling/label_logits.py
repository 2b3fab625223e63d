"""Which logits predict which label tokens, for T5 (decoder position j predicts label j) and causal models (position
t predicts token t+1), in the two shapes the code needs: flat (teacher training, cache writing, held-back loss) and
left-aligned per row (the student's losses, matching the cache's per-instance order).

A causal LM's head runs only over the label window (`causal_label_window`, HF's `logits_to_keep`): the full
(N, L, V) logits were the largest tensor of a teacher step and of cache writing, while the labels span the answer
alone (~128 of ~1,150 positions for an SNI prompt; with teacher.prompt=input, still the prompt's ~80 of ~200).
"""
from __future__ import annotations

import torch

IGNORE = -100  # label value the losses skip (data.collate.IGNORE)


def causal_label_window(labels: torch.Tensor) -> tuple[int, int]:
    """[first, last]: the positions whose logits predict a label token of some row (position t predicts t+1), and
    `last` one past the last of those, so that the window's own shift (`align_label_logits` on
    labels[:, first:last + 1]) pairs exactly what the full logits pair. No label at all: [0, 1]."""
    predicts = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()[:, 0]
    if predicts.numel() == 0:
        return 0, min(1, labels.shape[1] - 1)
    return int(predicts[0]), int(predicts[-1]) + 1


def model_label_logits(model: torch.nn.Module, causal: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An HF model's logits at the label positions, flat: `align_label_logits` of its full logits, but a causal
    model's LM head runs over the label window alone (`causal_label_window`, `logits_to_keep`). T5's decoder reads
    the labels shifted right: its logits are the labels' already."""
    if not causal:
        dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec,
                       use_cache=False).logits
        return align_label_logits(logits, labels, False)
    first, last = causal_label_window(labels)
    keep = torch.arange(first, last + 1, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    return align_label_logits(logits, labels[:, first:last + 1], True)


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
