"""Kernel dispatch: fused Triton kernels on CUDA, the torch reference elsewhere; overridable per call/config.

`backend` (config `hypernet.kernel`): "auto" (triton when the tensors are on CUDA and triton imports; the head stays
on cuBLAS, see HEAD_AUTO_BACKEND), "reference",
or "triton" (forced; on CPU it runs only under Triton's interpreter, `TRITON_INTERPRET=1` set before triton is
first used, which is how the kernel tests run without a GPU).

The Triton modules are imported lazily: importing this module never imports triton, so CPU-only runs and the
interpreter switch (read when a kernel is decorated) are unaffected by import order.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch

from ..errors import ConfigError
from . import reference
from .grouped_lora import TaskGroups, grouped_lora

BACKENDS = ("auto", "reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it may be absent, or broken, on a CPU-only install)."""
    try:
        import triton  # noqa: F401
    except Exception:  # an ImportError, or a broken install raising something else
        return False
    return True


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"reference" or "triton" for tensors on `device`; raises ConfigError for an unknown or impossible choice."""
    if backend not in BACKENDS:
        raise ConfigError(f"hypernet.kernel: unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if not triton_available():
        raise ConfigError("hypernet.kernel=triton but triton cannot be imported; install triton or use "
                          "hypernet.kernel=auto/reference")
    if device.type != "cuda" and not _interpret_enabled():
        raise ConfigError(f"hypernet.kernel=triton needs CUDA tensors (got device {device}); on CPU set "
                          "TRITON_INTERPRET=1 before the first triton import (slow, for tests) or use "
                          "hypernet.kernel=auto/reference")
    return "triton"


def _triton_module(name: str) -> ModuleType:
    if name == "lora":
        from . import triton_lora as mod
    else:
        from . import triton_hyperhead as mod
    return mod


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor, scale: float,
                   backend: str = "auto", groups: Optional[TaskGroups] = None,
                   base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s · (x @ A_tᵀ) @ B_tᵀ per batch row; shapes as in `reference.segmented_lora`. With `base` (N, T, d_out):
    base + that term (the hooked linear's output; the grouped path adds it inside its second matmul).

    A and B may be strided views (e.g. `A_all[:, layer]` from `hyper_head`); rows may be in any task order.
    `groups` (`TaskGroups.of(task_ids)`, made once per forward by the hooks) lets the torch path run one matmul pair
    per task (`grouped_lora`) instead of gathering A/B for every row; without it the torch path is the reference.
    """
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3 or task_ids.dim() != 1:
        raise ValueError(f"segmented_lora: expected x (N, T, d_in), A (n_tasks, r, d_in), B (n_tasks, d_out, r), "
                         f"task_ids (N,); got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, "
                         f"{tuple(task_ids.shape)}")
    if A.shape[2] != x.shape[2] or B.shape[2] != A.shape[1] or B.shape[0] != A.shape[0] \
            or task_ids.shape[0] != x.shape[0]:
        raise ValueError(f"segmented_lora: inconsistent shapes x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, task_ids {tuple(task_ids.shape)}")
    if resolve_backend(backend, x.device) == "reference":
        if groups is not None and use_groups(groups):
            if sum(groups.counts) != x.shape[0]:
                raise ValueError(f"segmented_lora: groups cover {sum(groups.counts)} rows, x has {x.shape[0]}")
            return grouped_lora(x, A, B, groups, scale, base=base)
        delta = reference.segmented_lora(x, A, B, task_ids, scale)
    else:
        delta = _triton_module("lora").segmented_lora(x, A, B, task_ids.to(torch.long), scale)
    return delta if base is None else base + delta.to(base.dtype)


# Grouping pays when each task's rows already sit together (the finetune's batches: tasks x instances, collated task
# by task): no A/B gather per row, and the backward has no scatter. Rows of interleaved tasks would need x permuted
# and y permuted back (a copy each way and two scatters in the backward), which costs about what the gather saves,
# and a batch of many tasks with a row or two each (evaluation sorted by length) would become one small matmul pair
# per task: those keep the per-row gather (bench/step_cost.py measures all three).
MIN_ROWS_PER_GROUP = 2


def use_groups(groups: TaskGroups) -> bool:
    """Whether the grouped path is taken for this batch (see the comment above)."""
    return groups.order is None and (groups.uniform or sum(groups.counts) >= MIN_ROWS_PER_GROUP * len(groups.counts))


# "auto" keeps the hypernetwork head on cuBLAS. Measured on H100 (bench/kernels.py: 8 tasks x 24 layers, d_h=512,
# r=32, d=2048): F.linear ran the forward 2.3x (fp32) / 6.2x (bf16) and forward+backward 5.5x / 4.7x faster than the
# fused Triton head, and its output slices already are the layouts the LoRA kernel reads (strided views, no copy).
# backend="triton" still runs the fused head (tests/kernels check it against the reference).
HEAD_AUTO_BACKEND = "reference"


def hyper_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r: int, d_in: int, d_out: int,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' A and B for one module type in one GEMM; shapes as in `reference.hyper_head`."""
    p = r * d_in + d_out * r
    if h.dim() != 3 or weight.shape != (p, h.shape[2]) or (bias is not None and bias.shape != (p,)):
        raise ValueError(f"hyper_head: expected h (n_tasks, n_layers, d_h), weight ({p}, d_h), bias ({p},) for "
                         f"r={r}, d_in={d_in}, d_out={d_out}; got {tuple(h.shape)}, {tuple(weight.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")
    choice = resolve_backend(backend, h.device)
    if choice == "reference" or (backend == "auto" and HEAD_AUTO_BACKEND == "reference"):
        return reference.hyper_head(h, weight, bias, r, d_in, d_out)
    return _triton_module("head").hyper_head(h, weight, bias, r, d_in, d_out)


_T5_FAMILY = ("t5", "mt5", "umt5", "longt5")


def choose_attn_implementation(arch: str, device: torch.device | str) -> str | None:
    """Attention implementation to pass to transformers' from_pretrained.

    LLaMA-style decoders: "flash_attention_2" when flash_attn imports and the model runs on CUDA, else "sdpa".
    T5 family: None (the library default; T5's relative position bias is not supported by flash-attn).
    """
    arch = arch.lower()
    if arch == "auto":
        raise ConfigError("choose_attn_implementation: backbone.arch=auto must be resolved from the model config "
                          "(config.model_type) first")
    if arch in _T5_FAMILY:
        return None
    if torch.device(device).type == "cuda" and _flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


@functools.lru_cache(maxsize=None)
def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # absent, or built against another torch/CUDA (raises ImportError/OSError/RuntimeError)
        return False
    return True
