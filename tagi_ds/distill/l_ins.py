"""L_ins: distance between a generated LoRA update and a teacher's, without materialising ΔW.

PEFT layout: A (r, d_in), B (d_out, r), ΔW = s·B·A (d_out, d_in). With G_B = BᵀB and G_A = AAᵀ (r×r):
  ‖s_g B_g A_g − s_t B_t A_t‖²_F = s_g² tr(G_Bg G_Ag) − 2 s_g s_t tr((B_tᵀ B_g)(A_g A_tᵀ)) + s_t² tr(G_Bt G_At)
which costs O(r² (d_in + d_out)) instead of O(d_out d_in r), and works for different ranks r_g ≠ r_t.

Precision: near convergence the three terms are nearly equal and cancel (relative difference 1e-3 between the two
updates leaves 1e-6 of the terms), so fp32 accumulation loses most digits. The factors are cast to float64 once
(they are small: r × d) and every product and the sum run in float64; the result returns in the input dtype.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def _tr_prod(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """tr(X Y) for batched (…, m, n) X and (…, n, m) Y, as sum(X ⊙ Yᵀ) (no m×m product)."""
    return (X * Y.transpose(-1, -2)).sum(dim=(-2, -1))


def _scale(s: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(s, dtype=torch.float64, device=like.device)


def delta_w_distance(A_g: torch.Tensor, B_g: torch.Tensor, s_g: float | torch.Tensor,
                     A_t: torch.Tensor, B_t: torch.Tensor, s_t: float | torch.Tensor,
                     normalize: bool = True) -> torch.Tensor:
    """‖s_g B_g A_g − s_t B_t A_t‖²_F (÷ ‖s_t B_t A_t‖²_F when `normalize`), batched over leading dims.

    A_g (…, r_g, d_in), B_g (…, d_out, r_g), A_t (…, r_t, d_in), B_t (…, d_out, r_t); s_g, s_t scalars or tensors
    broadcastable to the leading dims (…). Returns (…) in A_g's dtype. A zero teacher update (‖ΔW_t‖ = 0) is not
    divided by: that entry returns the unnormalised distance.
    """
    if A_g.shape[-1] != A_t.shape[-1] or B_g.shape[-2] != B_t.shape[-2]:
        raise ValueError(f"delta_w_distance: generated ΔW is {B_g.shape[-2]}×{A_g.shape[-1]} but the teacher's is "
                         f"{B_t.shape[-2]}×{A_t.shape[-1]}")
    if A_g.shape[-2] != B_g.shape[-1] or A_t.shape[-2] != B_t.shape[-1]:
        raise ValueError(f"delta_w_distance: rank mismatch inside a pair: A_g {tuple(A_g.shape)} B_g "
                         f"{tuple(B_g.shape)}, A_t {tuple(A_t.shape)} B_t {tuple(B_t.shape)}")
    out_dtype = A_g.dtype
    Ag, Bg, At, Bt = (x.to(torch.float64) for x in (A_g, B_g, A_t, B_t))
    sg, st = _scale(s_g, Ag), _scale(s_t, Ag)
    BgT, BtT = Bg.transpose(-1, -2), Bt.transpose(-1, -2)
    gg = _tr_prod(BgT @ Bg, Ag @ Ag.transpose(-1, -2))  # (…)  tr(G_Bg G_Ag), r_g×r_g factors
    gt = _tr_prod(BtT @ Bg, Ag @ At.transpose(-1, -2))  # (…)  tr((B_tᵀB_g)(A_g A_tᵀ)), r_t×r_g and r_g×r_t
    tt = _tr_prod(BtT @ Bt, At @ At.transpose(-1, -2))  # (…)  tr(G_Bt G_At)
    teacher = st * st * tt
    dist = sg * sg * gg - 2.0 * sg * st * gt + teacher
    if normalize:
        dist = torch.where(teacher > 0, dist / torch.where(teacher > 0, teacher, torch.ones_like(teacher)), dist)
    return dist.to(out_dtype)


def delta_w_distance_dense(A_g: torch.Tensor, B_g: torch.Tensor, s_g: float | torch.Tensor,
                           A_t: torch.Tensor, B_t: torch.Tensor, s_t: float | torch.Tensor,
                           normalize: bool = True) -> torch.Tensor:
    """Reference: materialise both ΔW (…, d_out, d_in) in float64. Returns float64 (…)."""
    Ag, Bg, At, Bt = (x.to(torch.float64) for x in (A_g, B_g, A_t, B_t))
    sg, st = _scale(s_g, Ag), _scale(s_t, Ag)
    dw_g = sg[..., None, None] * (Bg @ Ag)  # (…, d_out, d_in)
    dw_t = st[..., None, None] * (Bt @ At)
    dist = (dw_g - dw_t).pow(2).sum(dim=(-2, -1))
    if normalize:
        dist = dist / dw_t.pow(2).sum(dim=(-2, -1))
    return dist


def l_ins_per_task(generated: Mapping[str, tuple[torch.Tensor, torch.Tensor]], s_g: float | torch.Tensor,
                   teachers: Sequence[tuple[Mapping[str, tuple[torch.Tensor, torch.Tensor]], float]]) -> torch.Tensor:
    """L_ins of every task of a batch, one `delta_w_distance` call per module type (not per task x module type).

    generated: module_type -> (A_g (n_tasks, L, r, d_in), B_g (n_tasks, L, d_out, r)), the hypernetwork's output;
    s_g its LoRA scale; teachers: per task (in the same order) its adapters module_type -> (A_t (L, r_t, d_in),
    B_t (L, d_out, r_t)) and scale s_t (all teachers share one rank per module type: they are stacked).
    Returns (n_tasks,) float32: per task, the mean over every (module type, layer) of the normalised
    ||dW_gen - dW_teacher||^2_F, the same value as looping `delta_w_distance` over tasks and module types and
    taking `torch.cat(per_module).mean()` per task. Differentiable in the generated factors.
    """
    if not generated:
        raise ValueError("l_ins_per_task: no generated adapters")
    n = next(iter(generated.values()))[0].shape[0]
    if len(teachers) != n:
        raise ValueError(f"l_ins_per_task: {n} generated tasks but {len(teachers)} teachers")
    dists = []
    for mt, (A_g, B_g) in generated.items():
        missing = [i for i, (ad, _) in enumerate(teachers) if mt not in ad]
        if missing:
            raise ValueError(f"l_ins_per_task: the teachers of tasks {missing} have no module type {mt!r}")
        shapes = {(tuple(ad[mt][0].shape), tuple(ad[mt][1].shape)) for ad, _ in teachers}
        if len(shapes) != 1:
            raise ValueError(f"l_ins_per_task: module type {mt!r}: teachers of different shapes {sorted(shapes)} "
                             f"cannot be stacked")
        A_t = torch.stack([ad[mt][0] for ad, _ in teachers]).to(A_g.device)  # (n, L, r_t, d_in)
        B_t = torch.stack([ad[mt][1] for ad, _ in teachers]).to(A_g.device)  # (n, L, d_out, r_t)
        s_t = torch.tensor([float(s) for _, s in teachers], dtype=torch.float64, device=A_g.device)[:, None]
        dists.append(delta_w_distance(A_g, B_g, s_g, A_t, B_t, s_t))  # (n, L)
    return torch.cat(dists, dim=1).float().mean(dim=1)
