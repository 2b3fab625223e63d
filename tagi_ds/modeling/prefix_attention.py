"""LLaMA instruction fusion without a per-row copy of the prefix: split self-attention over [task prefix ; own row].

Every row of task t attends to [K_t ; K_row] (t's instruction keys, computed once per task by the frozen model, then
the row's own causal keys). The cache path (`fusion.lazy_prefix_cache`) expands K_t/V_t to every row of the batch in
every layer (index_select), concatenates them with the row's K/V and runs SDPA over Li + T keys; SDPA's backward then
also computes a gradient for every row's copy of the (frozen) prefix, which autograd throws away.

Here the scores are computed in two parts and softmaxed together, as T5's `fusion.split_cross_attention` does:
  - against the prefix, per task group: the rows of one task are contiguous after `TaskGroups` ordering, so their
    queries are one (rows_of_task * T) block multiplied by that task's K_t^T once (`fusion._per_entry_matmul`);
  - against the row's own keys: an ordinary batched matmul with the causal + padding bias;
  - one softmax over [prefix ; own] (float32 at least), then P_prefix @ V_t per task group + P_own @ V_row.
The prefix K/V never require grad, so backward computes no gradient for them. GQA: the query heads sharing one kv head
are folded into the query axis ((N, H, T, d) viewed as (N, H_kv, rep*T, d): no copy, no repeat_kv).

Installed per attention module like T5's cached cross-attention: the module's `forward` becomes
`_PrefixAttentionForward`, which only changes anything when the `PREFIX_FUSION_KWARG` keyword reaches it (the student's
teacher-forced forward); without it (instruction pass, generation, a merged copy) the module's own forward runs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TagiError
from ..kernels.grouped_lora import TaskGroups
from .fusion import PrefixKV, _per_entry_matmul

PREFIX_FUSION_KWARG = "tagi_instruction_prefix"  # the keyword that carries a PrefixFusion down to the attentions


@dataclass
class PrefixFusion:
    """What every self-attention of one teacher-forced forward reads: the per-task prefix, the rows' task groups and
    the additive bias over [prefix keys ; own keys] (0 where a query may look, the float32 minimum elsewhere)."""

    prefix: PrefixKV  # per layer (K, V), each (n_tasks, kv_heads, Li, head_dim); no grad
    groups: TaskGroups  # rows grouped by task (computed once per forward: one host sync)
    bias: torch.Tensor  # (N, 1, T, Li + T) float32


def prefix_fusion(prefix: PrefixKV, instr_mask: torch.Tensor, input_mask: torch.Tensor, task_ids: torch.Tensor,
                  groups: TaskGroups | None = None) -> dict[str, PrefixFusion]:
    """The backbone keyword that makes every installed attention attend to [task_ids[i]'s prefix ; row i causally].

    instr_mask (n_tasks, Li), input_mask (N, T), task_ids (N,) long. Same attention pattern as the cache path's HF
    mask: prefix keys visible where the instruction is real; own keys where causal and real."""
    N, T = input_mask.shape
    dev = input_mask.device
    pre = instr_mask.to(dev).bool().index_select(0, task_ids)[:, None, :].expand(N, T, -1)  # (N, T, Li)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()  # (T, T): query i sees keys <= i
    own = causal[None] & input_mask.bool()[:, None, :]  # (N, T, T)
    allowed = torch.cat([pre, own], dim=-1)[:, None]  # (N, 1, T, Li + T)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill_(~allowed, torch.finfo(
        torch.float32).min)
    return {PREFIX_FUSION_KWARG: PrefixFusion(prefix, groups or TaskGroups.of(task_ids), bias)}


def split_pays(config, n_query: int) -> bool:
    """Whether a forward over inputs of n_query tokens takes the split path (else the expanded cache + SDPA).

    The split path materialises the scores, (heads x n_query) floats per row per key, where SDPA's fused kernels
    keep O(n_query) per head; the cache path materialises each row's copy of the prefix K and V, 2 x kv_heads x
    head_dim values per row per key, and the SDPA backward's gradient for it. Split when its scores are no larger
    than that copy: the finetune's short inputs (tens of tokens) under a long instruction, where the copy dominates
    the attention's cost (bench/prefix_attention.py); long inputs (the pretrain's 512-token HINT segments) keep the
    fused kernel, whose memory does not grow with n_query^2."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * n_query <= 2 * kv_heads * head_dim


def split_prefix_attention(q: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, k_i: torch.Tensor,
                           v_i: torch.Tensor, groups: TaskGroups, bias: torch.Tensor, scaling: float,
                           dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """softmax(q [k_i[task] ; k_x]^T * scaling + bias) [v_i[task] ; v_x] per row, the prefix never copied per row.

    q (N, H, T, d); k_x, v_x (N, Hkv, T, d) per row; k_i, v_i (n_tasks, Hkv, Li, d) per task; bias (N, 1, T, Li+T).
    → (N, H, T, d)."""
    N, H, T, d = q.shape
    hkv, li = k_x.shape[1], k_i.shape[2]
    if H % hkv:
        raise TagiError(f"split prefix attention: {H} query heads do not share {hkv} key/value heads evenly")
    rep = H // hkv
    qf = (q * scaling).reshape(N, hkv, rep * T, d)  # GQA: a kv head's query heads folded into the query axis
    s_i = _per_entry_matmul(qf, k_i.to(q.dtype).transpose(2, 3), groups)  # (N, Hkv, rep*T, Li)
    s_x = torch.matmul(qf, k_x.transpose(2, 3))  # (N, Hkv, rep*T, T)
    scores = torch.cat([s_i, s_x], dim=-1).reshape(N, H, T, li + T)
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16/fp16 scores: softmax in float32
    probs = torch.softmax(wide + bias, dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training).reshape(N, hkv, rep * T, li + T)
    out = _per_entry_matmul(probs[..., :li], v_i.to(q.dtype), groups) + torch.matmul(probs[..., li:], v_x)
    return out.reshape(N, H, T, d)  # (the sum may come out in a permuted layout: reshape, not view)


class _PrefixAttentionForward:
    """The replacement `forward` of one LLaMA-style self-attention (q/k/v/o projections, RoPE, no q/k norms). With the
    PrefixFusion keyword it runs the split attention; otherwise the module's own forward. A class, not a closure, so
    deep copies of the model (merge_into_copy) keep a forward bound to the copied module."""

    is_tagi_prefix_attention = True

    def __init__(self, attn: nn.Module):
        self.attn = attn
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model family's own RoPE

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        fusion: PrefixFusion | None = kwargs.pop(PREFIX_FUSION_KWARG, None)
        attn = self.attn
        if fusion is None:
            return type(attn).forward(attn, hidden_states, *args, **kwargs)
        n, t = hidden_states.shape[:2]
        q = attn.q_proj(hidden_states).view(n, t, -1, attn.head_dim).transpose(1, 2)  # (N, H, T, d)
        k = attn.k_proj(hidden_states).view(n, t, -1, attn.head_dim).transpose(1, 2)  # (N, Hkv, T, d)
        v = attn.v_proj(hidden_states).view(n, t, -1, attn.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = self.rope(q, k, cos, sin)
        k_i, v_i = fusion.prefix[attn.layer_idx]
        out = split_prefix_attention(q, k, v, k_i, v_i, fusion.groups, fusion.bias, attn.scaling,
                                     dropout=attn.attention_dropout, training=attn.training)
        out = out.transpose(1, 2).reshape(n, t, -1)  # (N, T, H*d)
        return attn.o_proj(out), None


def _llama_attentions(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def supports_prefix_attention(model: nn.Module) -> bool:
    """Whether every self-attention of this *ForCausalLM has the LLaMA layout the split path recomputes (q/k/v/o
    projections, RoPE from its modeling module, no q/k norms or sliding window); other families keep the cache path."""
    try:
        attns = _llama_attentions(model)
    except AttributeError:
        return False
    for attn in attns:
        mod = sys.modules.get(type(attn).__module__)
        plain = all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling",
                                               "layer_idx", "attention_dropout"))
        extra = any(getattr(attn, a, None) is not None for a in ("q_norm", "k_norm", "sliding_window"))
        if not plain or extra or not hasattr(mod, "apply_rotary_pos_emb"):
            return False
    return True


def install_prefix_attention(model: nn.Module) -> None:
    """Give every self-attention of a LLaMA-style *ForCausalLM the split prefix path (idempotent; state_dict keys,
    module names and LoRA hooks on q/k/v/o unchanged; without the keyword nothing changes)."""
    if not supports_prefix_attention(model):
        raise TagiError(f"split prefix attention: {type(model).__name__}'s attention layout is not LLaMA's")
    for attn in _llama_attentions(model):
        if not getattr(attn.__dict__.get("forward"), "is_tagi_prefix_attention", False):
            attn.forward = _PrefixAttentionForward(attn)
