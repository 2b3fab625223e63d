"""The hypernetwork: pooled task vector → per-task LoRA A and B for every target layer (Text-to-LoRA style).

task vector ─► pooler (Linear + GELU) ─┐
layer id ─► layer embedding ───────────┼─► concat ─► MLP trunk ─► one head per module type ─► A, B
module type ─► type embedding ─────────┘
All (task, layer) pairs of all module types go through the trunk as one batch; each head is one GEMM
(`dispatch.hyper_head`). The B half of every head starts at exactly zero, so ΔW = 0 at init while gradients reach B.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ArtifactMismatchError
from ..kernels import dispatch
from .backbone import TargetSpec, module_types


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (n, L, d) over positions where mask (n, L) is 1 → (n, d); padding never changes the result."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (n, L, 1)
    total = (hidden * m).sum(dim=1)  # (n, d)
    count = m.sum(dim=1).clamp_min(1.0)  # (n, 1): an all-padding row pools to zeros, not NaN
    return total / count


class HyperNetwork(nn.Module):
    def __init__(self, specs: Sequence[TargetSpec], input_dim: int, r: int, hidden: int = 256, trunk_layers: int = 2,
                 embed_dim: int = 64, backend: str = "auto"):
        super().__init__()
        self.specs = list(specs)
        self.input_dim, self.r, self.hidden = input_dim, r, hidden
        self.trunk_layers, self.embed_dim, self.backend = trunk_layers, embed_dim, backend
        self.types = module_types(self.specs)
        # module_type → (n_layers, d_in, d_out), from the specs (i.e. the config), never from weights
        self.shapes: dict[str, tuple[int, int, int]] = {}
        for s in self.specs:
            n, _, _ = self.shapes.get(s.module_type, (0, s.d_in, s.d_out))
            self.shapes[s.module_type] = (max(n, s.layer + 1), s.d_in, s.d_out)
        max_layers = max(n for n, _, _ in self.shapes.values())

        self.pooler = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU())
        self.layer_embed = nn.Embedding(max_layers, embed_dim)
        self.type_embed = nn.Embedding(len(self.types), embed_dim)
        trunk: list[nn.Module] = []
        width = hidden + 2 * embed_dim
        for _ in range(trunk_layers):
            trunk += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.trunk = nn.Sequential(*trunk, nn.LayerNorm(width))
        self.head_weight = nn.ParameterDict()
        self.head_bias = nn.ParameterDict()
        for i, mt in enumerate(self.types):
            _, d_in, d_out = self.shapes[mt]
            self.head_weight[str(i)] = nn.Parameter(torch.empty(r * d_in + d_out * r, width))
            self.head_bias[str(i)] = nn.Parameter(torch.empty(r * d_in + d_out * r))
        self.reset_heads()

    def reset_heads(self) -> None:
        """A part random, B part exactly zero (weight rows and bias): ΔW = s·B·A = 0 at init, ∂L/∂B ≠ 0."""
        with torch.no_grad():
            for i, mt in enumerate(self.types):
                _, d_in, _ = self.shapes[mt]
                w, b = self.head_weight[str(i)], self.head_bias[str(i)]
                n_a = self.r * d_in
                # The trunk ends in a LayerNorm (unit-scale features), so std 1/sqrt(width·d_in) gives A entries of
                # about 1/sqrt(d_in): the scale of PEFT's kaiming init of A.
                w[:n_a].normal_(0.0, 1.0 / math.sqrt(w.shape[1] * d_in))
                w[n_a:].zero_()
                b.zero_()

    def forward(self, task_vectors: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """task_vectors (n_tasks, input_dim) → {module_type: (A (n_tasks, L, r, d_in), B (n_tasks, L, d_out, r))}."""
        n_tasks = task_vectors.shape[0]
        dtype = self.pooler[0].weight.dtype
        task = self.pooler(task_vectors.to(dtype))  # (n_tasks, hidden)
        # Every (type, layer) pair of every module type, as one batch through the trunk.
        type_ids, layer_ids, sizes = [], [], []
        for i, mt in enumerate(self.types):
            n_layers = self.shapes[mt][0]
            type_ids.append(torch.full((n_layers,), i, dtype=torch.long))
            layer_ids.append(torch.arange(n_layers))
            sizes.append(n_layers)
        dev = task.device
        emb = torch.cat([self.layer_embed(torch.cat(layer_ids).to(dev)),
                         self.type_embed(torch.cat(type_ids).to(dev))], dim=-1)  # (P, 2·embed)
        n_pairs = emb.shape[0]
        x = torch.cat([task[:, None].expand(n_tasks, n_pairs, -1),
                       emb[None].expand(n_tasks, n_pairs, -1)], dim=-1)  # (n_tasks, P, hidden + 2·embed)
        h = self.trunk(x)  # (n_tasks, P, hidden)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (mt, h_mt) in enumerate(zip(self.types, torch.split(h, sizes, dim=1))):
            _, d_in, d_out = self.shapes[mt]
            out[mt] = dispatch.hyper_head(h_mt, self.head_weight[str(i)], self.head_bias[str(i)], self.r, d_in, d_out,
                                          backend=self.backend)
        return out

    # ---------------------------------------------------------------------------------------------- export
    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this module (JSON-serialisable); weights go separately (state_dict)."""
        return {"specs": [dataclasses.asdict(s) for s in self.specs], "input_dim": self.input_dim, "r": self.r,
                "hidden": self.hidden, "trunk_layers": self.trunk_layers, "embed_dim": self.embed_dim}

    @classmethod
    def from_config_dict(cls, d: dict[str, Any], backend: str = "auto") -> "HyperNetwork":
        try:
            specs = [TargetSpec(**s) for s in d["specs"]]
            return cls(specs, int(d["input_dim"]), int(d["r"]), hidden=int(d["hidden"]),
                       trunk_layers=int(d["trunk_layers"]), embed_dim=int(d["embed_dim"]), backend=backend)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactMismatchError(f"hypernetwork config: cannot rebuild from {sorted(d)}: {e}") from e
