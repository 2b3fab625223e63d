"""Student helpers shared by the modeling and adapter tests (importable from every test folder: pytest puts tests/
on sys.path for the root conftest)."""
from __future__ import annotations

import torch

from tagi_ds.modeling.tagi import TagiStudent


def randomize_b_heads(student: TagiStudent, std: float = 0.05, seed: int = 2) -> None:
    """Non-zero B half of every hypernetwork head (weight rows and bias), so generated adapters change the backbone
    (ΔW ≠ 0); a fresh head's B half is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    hn = student.hypernet
    with torch.no_grad():
        for i, mt in enumerate(hn.types):
            n_a = hn.r * hn.shapes[mt][1]
            for p in (hn.head_weight[str(i)], hn.head_bias[str(i)]):
                p[n_a:] = torch.randn(p[n_a:].shape, generator=g) * std
