"""Tiny seeded backbones and helpers shared by the modeling tests (imported as a module, not a conftest)."""
from __future__ import annotations

import torch

from tagi_ds.modeling.backbone import KINDS
from tagi_ds.modeling.tagi import TagiStudent, build_student
from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config

ALL_KINDS = list(KINDS)


def tiny_backbone(arch: str):
    cfg = tiny_t5_config(vocab_size=256, d_model=32, num_layers=2, num_heads=4, d_ff=64) if arch == "t5" else \
        tiny_llama_config(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64)
    return build_from_config(cfg, seed=0, frozen=True)


def make_student(arch: str, fusion: bool = True, train_encoder: bool = False, kinds=None) -> TagiStudent:
    torch.manual_seed(1)
    return build_student(tiny_backbone(arch), arch, kinds or ALL_KINDS, r=4, alpha=8.0, hidden=32, trunk_layers=2,
                         embed_dim=8, fusion=fusion, train_encoder=train_encoder)


def rand_ids(shape, seed: int, low: int = 3, high: int = 250) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))
