"""Instruction fusion: let the input's computation see the instruction, encoded once per task.

T5: the decoder cross-attends to [instruction states ; input states] (HINT). Two ways to run it, same numbers:
  - cached (the default, `TagiStudent(cache_cross_kv=True)`): each decoder layer's cross-attention keys/values over
    the instruction states are projected once per task (`t5_instruction_kv`, an `InstructionKV`) and every row of
    the task attends to [its task's instruction K/V ; its own input K/V] (`split_cross_attention`): the
    instruction K/V are neither copied per row nor projected again per row or per decode step;
  - concatenated (`fuse_encoder_states`): [instruction states ; input states] per row, and HF's T5 projects all of
    them in every row (what ran before issue 18; kept for the benchmark's side-by-side comparison).
LLaMA: the instruction's key/value cache, computed once per task by the frozen model (no LoRA), is a prefix of
every row of that task; the input's positions continue after the real instruction length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TagiError
from ..kernels.grouped_lora import TaskGroups
from .hf_compat import (T5_FUSION_KWARG, cached_cross_kv, cross_attention_result, find_cache, output_cache,
                        store_cross_kv, t5_cross_attentions, t5_kwargs_reach_cross_attention)

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

# ------------------------------------------------------------------------------------------------ T5: cached K/V
@dataclass
class InstructionKV:
    """Every decoder cross-attention's keys and values over the instruction states of some tasks: projected once per
    task (with that task's LoRA when the cross-attention k/v are LoRA targets) and read by all of the task's rows,
    at every decode step."""

    keys: tuple[torch.Tensor, ...]  # per decoder layer: (n, heads, Li, d_kv)
    values: tuple[torch.Tensor, ...]  # per decoder layer: (n, heads, Li, d_kv)
    mask: torch.Tensor  # (n, Li): 1 on real instruction tokens
    tasks: torch.Tensor  # (n,) long: the TaskEncoding index of each entry

    def slots(self, task_ids: torch.Tensor, n_tasks: int) -> torch.Tensor:
        """(N,) entry of each row's task. Raises TagiError when a row's task has no entry here."""
        lut = torch.full((n_tasks,), -1, dtype=torch.long, device=task_ids.device)
        lut[self.tasks.to(task_ids.device)] = torch.arange(self.tasks.numel(), device=task_ids.device)
        slots = lut[task_ids]
        if bool((slots < 0).any()):
            missing = sorted(set(task_ids[slots < 0].tolist()))
            raise TagiError(f"InstructionKV holds tasks {self.tasks.tolist()}, the batch also has tasks {missing}: "
                            "compute it for every task of the batch (TagiStudent.instruction_kv)")
        return slots


def _check_t5(model: nn.Module) -> None:
    if not t5_kwargs_reach_cross_attention(model):
        import transformers

        raise ConfigError(f"the T5 instruction K/V cache needs transformers ≥ 5.0 (keyword arguments reach the "
                          f"cross-attention); installed {transformers.__version__}")


def t5_instruction_kv(model: nn.Module, states: torch.Tensor, mask: torch.Tensor, tasks: torch.Tensor
                      ) -> InstructionKV:
    """Project the instruction states (n, Li, d) of `tasks` (n,) through every decoder cross-attention's k and v.

    Any active LoRA hooks apply (their task ids must then be `tasks`, one row per task): that is what makes the
    instruction K/V of a task the same in all of its rows."""
    keys, values = [], []
    for attn in t5_cross_attentions(model):
        x = states.to(attn.k.weight.dtype)
        shape = (x.shape[0], x.shape[1], attn.n_heads, attn.key_value_proj_dim)
        keys.append(attn.k(x).view(shape).transpose(1, 2))  # (n, H, Li, d_kv)
        values.append(attn.v(x).view(shape).transpose(1, 2))
    return InstructionKV(tuple(keys), tuple(values), mask, tasks)


@dataclass
class CrossFusion:
    """What the cross-attentions of one backbone call read: the instruction K/V, the rows grouped by the entry they
    read, and the additive mask over [instruction ; input] keys."""

    kv: InstructionKV
    groups: TaskGroups  # rows grouped by their entry of `kv` (computed once per call: one host sync)
    bias: torch.Tensor  # (N, Li + Lx) float32: 0 on real keys, the float32 minimum on padding


def cross_fusion_kwargs(kv: InstructionKV, task_ids: torch.Tensor, n_tasks: int, input_mask: torch.Tensor
                        ) -> dict[str, CrossFusion]:
    """The keyword argument that makes a T5 call (with `install_cached_cross_attention` done) cross-attend to
    [instruction K/V of row i's task ; row i's input states]. task_ids (N,) index the TaskEncoding (n_tasks)."""
    slots = kv.slots(task_ids, n_tasks)
    mask = torch.cat([kv.mask.to(input_mask.device).index_select(0, slots), input_mask.to(kv.mask.dtype)], dim=1)
    bias = (1.0 - mask.float()) * torch.finfo(torch.float32).min  # (N, Li + Lx)
    return {T5_FUSION_KWARG: CrossFusion(kv, TaskGroups.of(slots), bias)}


def _per_entry_matmul(x: torch.Tensor, w: torch.Tensor, groups: TaskGroups) -> torch.Tensor:
    """Row i of x (N, H, T, a) times w[entry of row i] (n, H, a, b) → (N, H, T, b), one matmul per entry over all of
    its rows (uniform groups: one batched matmul), never a per-row copy of w."""
    N, H, T, a = x.shape
    xs = x if groups.order is None else x.index_select(0, groups.order)  # rows grouped by entry
    if groups.uniform:
        G, c = len(groups.tasks), groups.counts[0]
        wg = w if groups.tasks == tuple(range(w.shape[0])) else w.index_select(0, groups.task_index)  # (G, H, a, b)
        y = torch.matmul(xs.reshape(G, c, H, T, a).transpose(1, 2).reshape(G, H, c * T, a), wg)  # (G, H, c*T, b)
        y = y.reshape(G, H, c, T, -1).transpose(1, 2).reshape(N, H, T, -1)
    else:
        parts, start = [], 0
        for t, c in zip(groups.tasks, groups.counts):
            xt = xs[start:start + c].transpose(0, 1).reshape(H, c * T, a)  # (H, c*T, a)
            parts.append(torch.matmul(xt, w[t]).reshape(H, c, T, -1).transpose(0, 1))  # (c, H, T, b)
            start += c
        y = torch.cat(parts)
    return y if groups.inverse is None else y.index_select(0, groups.inverse)


def split_cross_attention(q: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, k_i: torch.Tensor,
                          v_i: torch.Tensor, groups: TaskGroups, bias: torch.Tensor, dropout: float = 0.0,
                          training: bool = False) -> torch.Tensor:
    """T5 attention (no 1/sqrt(d) scaling, no position bias across attention) of queries q (N, H, T, d_kv) over
    [k_i[entry] ; k_x] with values [v_i[entry] ; v_x], softmax over both key sets together (at least float32).

    k_x, v_x: (N, H, Lx, d_kv) per row; k_i, v_i: (n, H, Li, d_kv) per entry; bias (N, Li + Lx). → (N, H, T, d_kv)."""
    li = k_i.shape[2]
    scores = torch.cat([_per_entry_matmul(q, k_i.transpose(2, 3), groups),  # (N, H, T, Li)
                        torch.matmul(q, k_x.transpose(2, 3))], dim=-1)  # (N, H, T, Li + Lx)
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16/fp16 scores: softmax in float32
    probs = torch.softmax(wide + bias[:, None, None, :], dim=-1).to(v_x.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    p_i, p_x = probs[..., :li], probs[..., li:]
    return _per_entry_matmul(p_i, v_i.to(v_x.dtype), groups) + torch.matmul(p_x, v_x)


class _CachedCrossForward:
    """The replacement `forward` of one decoder cross-attention module. With the CrossFusion keyword it attends to
    [instruction K/V ; input K/V]; without it, it is the module's own forward. A class, not a closure, so deep copies
    of the model (merge_into_copy) keep a forward bound to the copied module."""

    is_tagi_cached_cross = True

    def __init__(self, attn: nn.Module):
        self.attn = attn

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        fusion: CrossFusion | None = kwargs.pop(T5_FUSION_KWARG, None)
        attn = self.attn
        if fusion is None:
            return type(attn).forward(attn, hidden_states, *args, **kwargs)
        states = kwargs.get("key_value_states")
        if states is None:
            raise TagiError(f"cached cross-attention of layer {attn.layer_idx}: called without key_value_states")
        cache = find_cache(kwargs)
        n, t = hidden_states.shape[:2]
        head = (attn.n_heads, attn.key_value_proj_dim)
        q = attn.q(hidden_states).view(n, t, *head).transpose(1, 2)  # (N, H, T, d_kv)
        kv_x = cached_cross_kv(cache, attn.layer_idx)  # the input's K/V, projected at the first decode step
        if kv_x is None:
            shape = (n, states.shape[1], *head)
            kv_x = (attn.k(states).view(shape).transpose(1, 2), attn.v(states).view(shape).transpose(1, 2))
            store_cross_kv(cache, attn.layer_idx, *kv_x)
        layer = attn.layer_idx
        out = split_cross_attention(q, kv_x[0], kv_x[1], fusion.kv.keys[layer], fusion.kv.values[layer],
                                    fusion.groups, fusion.bias, dropout=attn.dropout, training=attn.training)
        out = out.transpose(1, 2).reshape(n, t, -1)
        return cross_attention_result(attn.o(out))


def install_cached_cross_attention(model: nn.Module) -> None:
    """Give every decoder cross-attention of a T5ForConditionalGeneration the cached-instruction path (idempotent;
    state_dict keys, module names and LoRA hooks on q/k/v/o are unchanged; without the keyword nothing changes)."""
    _check_t5(model)
    for attn in t5_cross_attentions(model):
        if not getattr(attn.__dict__.get("forward"), "is_tagi_cached_cross", False):
            attn.forward = _CachedCrossForward(attn)
