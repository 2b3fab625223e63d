"""Instruction fusion: let the input's computation see the instruction, encoded once per task.

T5: the decoder cross-attends to [instruction states ; input states] (HINT).
LLaMA: the instruction's key/value cache, computed once per task by the frozen model (no LoRA), is a prefix of
every row of that task; the input's positions continue after the real instruction length.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .hf_compat import output_cache

# Per decoder layer: (keys, values), each (n_tasks, kv_heads, Li, head_dim).
PrefixKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def fuse_encoder_states(instr_states: torch.Tensor, instr_mask: torch.Tensor, input_states: torch.Tensor,
                        input_mask: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[instr_states[task_ids] ; input_states] → states (N, Li+Lx, d), mask (N, Li+Lx). Padding may sit in the middle:
    cross-attention only reads the mask, never positions."""
    states = torch.cat([instr_states.index_select(0, task_ids).to(input_states.dtype), input_states], dim=1)
    mask = torch.cat([instr_mask.index_select(0, task_ids).to(input_mask.dtype), input_mask], dim=1)
    return states, mask


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids (N, L) counting only real tokens, so left or right padding never shifts them; pads get the
    position of the previous real token (they are masked anyway). offset: int or (N,) start position per row."""
    pos = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    if isinstance(offset, torch.Tensor):
        offset = offset.long().view(-1, 1)
    return pos + offset


@torch.no_grad()
def llama_instruction_pass(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                           ) -> tuple[torch.Tensor, PrefixKV]:
    """One frozen forward over the instructions → (last hidden state (n_tasks, Li, d), prefix K/V per layer).

    `model` is a *ForCausalLM; the LoRA hooks must be inactive (they are outside `apply`)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask), use_cache=True)
    kv = tuple((layer.keys, layer.values) for layer in output_cache(out).layers)
    return out.last_hidden_state, kv


def expand_prefix(prefix: PrefixKV, task_ids: torch.Tensor, config) -> "DynamicCache":  # noqa: F821
    """A fresh DynamicCache whose row i holds task task_ids[i]'s instruction K/V (the per-task tensors are not
    modified by later cache updates: index_select copies)."""
    from transformers import DynamicCache

    rows = [(k.index_select(0, task_ids), v.index_select(0, task_ids)) for k, v in prefix]
    return DynamicCache(rows, config=config)


def prefix_mask_and_positions(instr_mask: torch.Tensor, input_mask: torch.Tensor, task_ids: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """attention mask (N, Li+Lx) = [instr_mask[task_ids] ; input_mask]; input position ids (N, Lx) start at the
    row's real (unpadded) instruction length."""
    im = instr_mask.index_select(0, task_ids).to(input_mask.dtype)  # (N, Li)
    mask = torch.cat([im, input_mask], dim=1)
    positions = positions_from_mask(input_mask, offset=im.long().sum(dim=1))
    return mask, positions


def select_prefix(prefix: PrefixKV | None, index: Sequence[int] | torch.Tensor) -> PrefixKV | None:
    """The prefix of a subset of tasks (e.g. one task alone)."""
    if prefix is None:
        return None
    idx = torch.as_tensor(index, dtype=torch.long, device=prefix[0][0].device)
    return tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in prefix)


def _prefix_layer_class():
    """PrefixLayer is defined on first use: its base class lives in transformers (imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One decoder layer's instruction K/V held per TASK (n_tasks, kv_heads, Li, head_dim), expanded to the
        batch's rows only inside that layer's attention call, and never stored grown: a teacher-forced forward reads
        each layer once. So no per-row copy of every layer exists at once (the old DynamicCache held N rows x all
        layers, then its concatenation with the input again); with activation checkpointing the per-row expansion
        lives for one block at a time."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, task_ids: torch.Tensor):
            super().__init__()
            self.prefix_keys, self.prefix_values, self.task_ids = keys, values, task_ids
            self.keys, self.values = keys[:0], values[:0]  # typed, empty: what `is_initialized` layers hold
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            rows = self.task_ids.to(self.prefix_keys.device)
            k = self.prefix_keys.index_select(0, rows).to(key_states.device, key_states.dtype)
            v = self.prefix_values.index_select(0, rows).to(value_states.device, value_states.dtype)
            return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

        def get_seq_length(self, *args) -> int:
            return int(self.prefix_keys.shape[-2])

        def get_mask_sizes(self, query, *args) -> tuple[int, int]:
            # transformers passes the query length (5.2x) or the cache positions (5.0)
            q = query if isinstance(query, int) else int(query.shape[-1])
            return self.get_seq_length() + q, 0

    return PrefixLayer


_PREFIX_LAYER: list = []


def lazy_prefix_cache(prefix: PrefixKV, task_ids: torch.Tensor, config):
    """A cache for one teacher-forced forward whose row i attends to task task_ids[i]'s instruction prefix, the prefix
    held per task (see PrefixLayer). Generation grows its cache step by step: it uses `expand_prefix`."""
    from transformers import DynamicCache

    if not _PREFIX_LAYER:
        _PREFIX_LAYER.append(_prefix_layer_class())
    cache = DynamicCache(config=config)
    cache.layers = [_PREFIX_LAYER[0](k, v, task_ids) for k, v in prefix]
    return cache
