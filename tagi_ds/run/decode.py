"""Greedy decoding, written once: a plain backbone (optionally with per-row LoRA through batched hooks) continuing
tokenized prompts, and the TAGI student answering instance inputs with its generated adapters. Every method of the
evaluation, the teachers' held-back scores, the backbone's copy check and `tagi-ds predict` decode through here.

Rows are decoded in batches of similar length (less padding; causal prompts left-padded so every row continues from
its last column) and returned in input order, cut at the first EOS. Batch widths are rounded up to a multiple of
`width_multiple` (collate.WIDTH_BUCKET by default): the CPU kernels keep a compiled kernel per shape, so exact widths
made host memory grow with the number of distinct lengths decoded (issue #17). Padding uses `collate.pad_id`: the
tokenizer's pad token, else its EOS (LLaMA-family tokenizers ship without a pad token); padded columns are masked,
and a row that has finished is filled with that id, which the cut at the first EOS removes.

Callers that report throughput pass a `DecodeStats` (rows, generated tokens up to and including each row's first
EOS); `on_batch(rows)` is called after every batch (progress bars).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..data.collate import WIDTH_BUCKET, decode_generated, pad_id, pad_rows

OnBatch = Optional[Callable[[int], None]]


@dataclass
class DecodeStats:
    """What a decoding call produced: rows answered and tokens generated (each row up to its first EOS)."""

    rows: int = 0
    new_tokens: int = 0

    def add(self, tokens: torch.Tensor, eos: Sequence[int]) -> None:
        """tokens: (N, T) generated ids of one batch."""
        ended = torch.isin(tokens, torch.tensor(list(eos), dtype=tokens.dtype, device=tokens.device))  # (N, T)
        first = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(ended[:, 0], tokens.shape[1],
                                                                                         dtype=torch.long))
        self.rows += int(tokens.shape[0])
        self.new_tokens += int(first.sum())


def eos_ids(tokenizer, model_config) -> list[int]:
    """The model's EOS ids (a list for LLaMA-3-style configs), else the tokenizer's."""
    eos = getattr(model_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)])
    return ids or [int(tokenizer.eos_token_id)]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of `batch_size`, shortest rows first (stable: equal lengths keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _padded(rows: Sequence[Sequence[int]], pad: int, left: bool, device, multiple: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask (N, W): W = the longest row rounded up to `multiple`; padding (left for causal prompts) masked."""
    mask = pad_rows([[1] * len(r) for r in rows], 0, left, multiple)
    return pad_rows(rows, pad, left, multiple).to(device), mask.to(device)


@torch.no_grad()
def decode_prompts(model, tokenizer, arch: str, prompts: Sequence[Sequence[int]], *, device, max_new_tokens: int,
                   batch_size: int, hooks=None, adapters=None, row_unit: Optional[Sequence[int]] = None,
                   stats: Optional[DecodeStats] = None, on_batch: OnBatch = None,
                   width_multiple: int = WIDTH_BUCKET) -> list[str]:
    """Greedy answers of a plain backbone to tokenized prompts; with `hooks`, row i gets unit row_unit[i]'s LoRA
    from `adapters` (stacked per unit)."""
    pad, eos = pad_id(tokenizer), eos_ids(tokenizer, model.config)
    out: list[str] = [""] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], batch_size):
        ids, mask = _padded([list(prompts[i]) for i in idx], pad, arch == "llama", device, width_multiple)
        ctx = contextlib.nullcontext()
        if hooks is not None:
            ctx = hooks.apply(adapters, torch.tensor([row_unit[i] for i in idx], dtype=torch.long, device=device))
        with ctx:
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad, eos_token_id=eos)
        new = gen if arch == "t5" else gen[:, ids.shape[1]:]
        if arch == "t5":  # T5's output starts with the decoder start token, which is not generated
            new = new[:, 1:]
        for i, text in zip(idx, decode_generated(tokenizer, new.cpu(), eos)):
            out[i] = text
        if stats is not None:
            stats.add(new, eos)
        if on_batch is not None:
            on_batch(len(idx))
    return out


@torch.no_grad()
def decode_student(student, tokenizer, encoding, adapters, inputs: Sequence[Sequence[int]],
                   task_of_row: Sequence[int], *, device, max_new_tokens: int, batch_size: int,
                   stats: Optional[DecodeStats] = None, on_batch: OnBatch = None,
                   width_multiple: int = WIDTH_BUCKET) -> list[str]:
    """Greedy answers of the TAGI student: row i is input ids `inputs[i]` of task `task_of_row[i]` (an index into
    `encoding` / `adapters`, which hold each task once); rows of different tasks share a batch.

    T5 with fusion: the instruction's cross-attention K/V are projected once per task for the whole call (not once
    per batch the task's rows fall into), which is what the report's FLOPs count. They live as long as the call, so
    their memory is bounded by the tasks of `encoding` (evaluation passes one unit: eval.tasks_per_batch)."""
    pad, eos = pad_id(tokenizer), eos_ids(tokenizer, student.backbone.config)
    out: list[str] = [""] * len(inputs)
    kv = None
    if student.arch == "t5" and student.fusion and student.cache_cross_kv and inputs:
        kv = student.instruction_kv(encoding, adapters, sorted(set(task_of_row)))
    for idx in length_batches([len(r) for r in inputs], batch_size):
        ids, mask = _padded([list(inputs[i]) for i in idx], pad, student.arch == "llama", device, width_multiple)
        task_ids = torch.tensor([task_of_row[i] for i in idx], dtype=torch.long, device=device)
        tokens = student.generate(encoding, task_ids, ids, mask, max_new_tokens, adapters=adapters,
                                  instruction_kv=kv)
        for i, text in zip(idx, decode_generated(tokenizer, tokens.cpu(), eos)):
            out[i] = text
        if stats is not None:
            stats.add(tokens, eos)
        if on_batch is not None:
            on_batch(len(idx))
    return out
