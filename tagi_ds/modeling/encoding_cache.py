"""Instruction encodings kept across steps: the frozen backbone reads a task's instruction once, not once per step.

A finetune micro batch encodes its tasks' instructions with one no-grad backbone forward (4 tasks x 64 tokens at
the bench's shapes: ~12% of the TAGI step, bench/train_step.py). The backbone is frozen and an instruction's tokens
never change, so the encoding of a task is the same at every step: `EncodingCache` keeps each instruction's
encoding (pooled vector, hidden states and LLaMA prefix K/V at its real length) in an LRU bounded in BYTES, keyed by
its token ids, and a batch whose instructions are all held skips the forward.

Valid only while the encoding cannot change: not when the instruction encoder trains (`train_encoder`), and the key
carries the identity of the student's instruction adapter. Under torch.distributed every rank must run the same
backbone forwards (ZeRO-3 gathers parameters inside them): the ranks agree by one all-reduce per step, and all of them
encode when any of them misses.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from .tagi import TagiStudent, TaskEncoding

Entry = tuple[torch.Tensor, torch.Tensor, Optional[tuple[tuple[torch.Tensor, torch.Tensor], ...]]]


def _bytes(entry: Entry) -> int:
    pooled, hidden, prefix = entry
    n = pooled.numel() * pooled.element_size() + hidden.numel() * hidden.element_size()
    for k, v in prefix or ():
        n += k.numel() * k.element_size() + v.numel() * v.element_size()
    return n


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on any rank (itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


class EncodingCache:
    """`encode(student, ids, mask)` = `student.encode_instructions(ids, mask)`, from memory when every row's
    instruction is held. ids, mask (n_tasks, Li) right-padded; max_bytes <= 0 disables the cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[Entry, int]] = OrderedDict()
        self._bytes = 0
        self.stats = {"hits": 0, "misses": 0}

    def usable(self, student: TagiStudent) -> bool:
        return self.max_bytes > 0 and not student.train_encoder

    def encode(self, student: TagiStudent, ids: torch.Tensor, mask: torch.Tensor) -> TaskEncoding:
        if not self.usable(student):
            return student.encode_instructions(ids, mask)
        counts = mask.sum(dim=1)  # (n_tasks,)
        if not bool((torch.arange(mask.shape[1], device=mask.device) < counts[:, None]).eq(mask.bool()).all()):
            return student.encode_instructions(ids, mask)  # not right-padded: no key of real tokens to slice
        lengths = counts.tolist()  # row i's real tokens are ids[i, :lengths[i]]
        adapter = id(student.instruction_adapter) if student.instruction_adapter is not None else None
        keys = [(adapter, tuple(ids[i, :n].tolist())) for i, n in enumerate(lengths)]
        held = [self._entries.get(k) for k in keys]
        if _any_rank(any(h is None for h in held), ids.device):
            self.stats["misses"] += 1
            encoding = student.encode_instructions(ids, mask)
            for i, (key, n) in enumerate(zip(keys, lengths)):
                self._put(key, self._slice(encoding, i, n))
            return encoding
        self.stats["hits"] += 1
        for k in keys:
            self._entries.move_to_end(k)
        return self._assemble([h[0] for h in held], mask)

    @staticmethod
    def _slice(enc: TaskEncoding, i: int, n: int) -> Entry:
        """Task i's encoding at its real length n, copied (a view would keep the whole batch's tensors alive)."""
        prefix = None if enc.prefix is None else tuple((k[i, :, :n].clone(), v[i, :, :n].clone())
                                                       for k, v in enc.prefix)
        return enc.pooled[i].detach().clone(), enc.hidden[i, :n].detach().clone(), prefix

    def _put(self, key: tuple, entry: Entry) -> None:
        size = _bytes(entry)
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = (entry, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old

    @staticmethod
    def _assemble(entries: list[Entry], mask: torch.Tensor) -> TaskEncoding:
        """The batch's TaskEncoding from held entries, zero-padded to the batch's width (the mask hides padding)."""
        width = mask.shape[1]

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # (.., n, ..) → (.., width, ..) along dim
            shape = list(t.shape)
            shape[dim] = width - t.shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        pooled = torch.stack([e[0] for e in entries])  # (n_tasks, d)
        hidden = torch.stack([pad(e[1], 0) for e in entries])  # (n_tasks, Li, d)
        prefix = None
        if entries[0][2] is not None:
            prefix = tuple((torch.stack([pad(e[2][layer][0], 1) for e in entries]),  # (n_tasks, kv_heads, Li, hd)
                            torch.stack([pad(e[2][layer][1], 1) for e in entries]))
                           for layer in range(len(entries[0][2])))
        return TaskEncoding(pooled, hidden, mask, prefix)
