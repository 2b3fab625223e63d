"""Torch reference implementations: the semantics every fused kernel must reproduce.

LoRA layout is PEFT's (ARCHITECTURE.md): A (r, d_in), B (d_out, r), ΔW = s·B·A, y = W x + s·B(A x).
Adapters are per task; a batch row's task is `task_ids[row]`.
"""
from __future__ import annotations

import torch


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The LoRA term for a task-grouped batch, by batched matmuls (no repeat of A/B over tokens).

    x: (N, T, d_in) rows of the batch; A: (n_tasks, r, d_in); B: (n_tasks, d_out, r); task_ids: (N,) long.
    Returns s · (x @ A_tᵀ) @ B_tᵀ, shape (N, T, d_out), in x's dtype.
    """
    a = A.index_select(0, task_ids).to(x.dtype)  # (N, r, d_in): one gather per row, not per token
    b = B.index_select(0, task_ids).to(x.dtype)  # (N, d_out, r)
    h = torch.bmm(x, a.transpose(1, 2))  # (N, T, r)
    return torch.bmm(h, b.transpose(1, 2)) * scale  # (N, T, d_out)


def hyper_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r: int, d_in: int, d_out: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One module type's hypernetwork head for all tasks and layers in one GEMM.

    h: (n_tasks, n_layers, d_h) trunk features; weight: (r*d_in + d_out*r, d_h); bias: (r*d_in + d_out*r,).
    The first r*d_in outputs are A row-major (r, d_in), the rest B row-major (d_out, r).
    Returns A (n_tasks, n_layers, r, d_in) and B (n_tasks, n_layers, d_out, r).
    """
    n_tasks, n_layers, _ = h.shape
    out = torch.nn.functional.linear(h, weight, bias)  # (n_tasks, n_layers, r*d_in + d_out*r)
    a = out[..., : r * d_in].reshape(n_tasks, n_layers, r, d_in)
    b = out[..., r * d_in:].reshape(n_tasks, n_layers, d_out, r)
    return a, b


def naive_per_token_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Text-to-LoRA-style baseline: A and B repeated for every token, then an einsum. For benchmarks only."""
    n, t, _ = x.shape
    a = A.index_select(0, task_ids)[:, None].expand(n, t, *A.shape[1:])  # (N, T, r, d_in)
    b = B.index_select(0, task_ids)[:, None].expand(n, t, *B.shape[1:])  # (N, T, d_out, r)
    a = a.contiguous()
    b = b.contiguous()
    h = torch.einsum("ntd,ntrd->ntr", x, a)
    return torch.einsum("ntr,ntor->nto", h, b) * scale
