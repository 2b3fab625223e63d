"""Teacher-like logits shared by the distillation tests."""
from __future__ import annotations

import torch


def teacher_logits(seed: int, L: int, V: int, scale: float = 4.0) -> torch.Tensor:
    """Peaked, LM-like logits (L, V): a few strong candidates over a Gaussian tail."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, V, generator=g) * scale / 2
    top = torch.randint(0, V, (L, 3), generator=g)
    logits.scatter_add_(1, top, torch.full((L, 3), scale * 2))
    return logits


def zipf_logits(seed: int, shape: tuple[int, ...], V: int, a: float = 3.0, noise: float = 0.3) -> torch.Tensor:
    """LM-like logits (*shape, V): Zipf ranks (p ∝ rank^-a at T=1) over a random vocabulary order, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, V + 1, dtype=torch.float32)
    base = -a * torch.log(ranks)  # (V,)
    rows = int(torch.tensor(shape).prod()) if shape else 1
    perm = torch.argsort(torch.rand(rows, V, generator=g), dim=-1)  # (rows, V) random id for each rank
    out = torch.empty(rows, V).scatter_(1, perm, base.expand(rows, V).contiguous())
    out = out + noise * torch.randn(rows, V, generator=g)
    return out.reshape(*shape, V)
