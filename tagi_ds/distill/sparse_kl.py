"""KL_T(teacher || student) when only the teacher's top-k log-probs are known (the logit cache).

The student's log-softmax is taken at temperature T over the FULL vocabulary (logsumexp), so the student's mass on
the k teacher ids is exact. The teacher's mass outside its top-k is unknown; two treatments:
  "renormalize": the teacher's top-k is renormalised to sum to 1 and the KL runs over those k ids only
                 (the student is compared on the k ids with its true, unrenormalised log-probs);
  "bucket":      the teacher's missing mass 1 - sum(p_k) is one extra outcome, compared with the student's mass
                 outside the k ids. This is the KL between the two distributions coarse-grained to k+1 outcomes,
                 so by the data-processing inequality it never exceeds the dense KL.
Both are multiplied by T^2 (Hinton et al.: keeps gradient size independent of T) and averaged over valid tokens.

Memory: logits of a batch are (N, L, V) with V up to 128k. The loss is computed over chunks of `chunk_tokens` valid
tokens inside a custom autograd Function that keeps no per-chunk activations: backward recomputes each chunk and
writes its gradient into one (N, L, V) buffer, so the only full-vocab temporaries are one chunk's.
"""
from __future__ import annotations

from typing import Literal

import torch

MissingMass = Literal["renormalize", "bucket"]


def _plogp_ratio(p_lp: torch.Tensor, s_lp: torch.Tensor) -> torch.Tensor:
    """sum_k p (log p - log q), with 0 * log 0 = 0 (a float16 store turns tiny teacher log-probs into -inf)."""
    p = p_lp.exp()
    return torch.where(p > 0, p * (p_lp - s_lp), torch.zeros_like(p)).sum(-1)


def token_kl(z: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor, temperature: float,
              missing_mass: str) -> torch.Tensor:
    """Per-token KL (no T^2). z (c, V) student logits; t_lp (c, k) teacher log-probs at T; t_ids (c, k) -> (c,)."""
    zt = z / temperature  # (c, V)
    s_lse = torch.logsumexp(zt, dim=-1)  # (c,)
    s_lp = zt.gather(-1, t_ids) - s_lse[:, None]  # (c, k) student log-probs at the teacher's ids
    if missing_mass == "renormalize":
        p_lp = t_lp - torch.logsumexp(t_lp, dim=-1, keepdim=True)  # (c, k), sums to 1
        return _plogp_ratio(p_lp, s_lp)
    kept_lse = torch.logsumexp(t_lp, dim=-1)  # (c,) log of the teacher's kept mass
    p_miss = (-torch.expm1(kept_lse)).clamp_min(0.0)  # (c,) 1 - kept, accurate when kept ~ 1
    kl = _plogp_ratio(t_lp, s_lp)  # (c,)
    if t_ids.shape[-1] >= z.shape[-1]:
        return kl  # the k ids cover the vocabulary: any "missing" teacher mass is rounding, not a real outcome
    # student mass outside the k ids, in log space (finite fill, not -inf, so a fully covered row has no NaN grad)
    outside = zt.scatter(-1, t_ids, torch.finfo(zt.dtype).min)  # (c, V)
    q_miss_lp = torch.logsumexp(outside, dim=-1) - s_lse  # (c,)
    bucket = torch.where(p_miss > 0, p_miss * (torch.log(p_miss.clamp_min(torch.finfo(zt.dtype).tiny)) - q_miss_lp),
                         torch.zeros_like(p_miss))
    return kl + bucket


class _SparseKL(torch.autograd.Function):
    """Sum of per-token KL over selected rows, chunked; backward recomputes each chunk (flat memory)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, rows: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor,
                temperature: float, missing_mass: str, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        # flat (T, V) student logits; rows (M,) indices of valid tokens; t_lp, t_ids (M, k)
        total = torch.zeros((), dtype=dtype, device=flat.device)
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            total = total + token_kl(flat.index_select(0, r).to(dtype), t_lp[s:s + chunk], t_ids[s:s + chunk],
                                      temperature, missing_mass).sum()
        ctx.save_for_backward(flat, rows, t_lp, t_ids)
        ctx.cfg = (temperature, missing_mass, chunk, dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        flat, rows, t_lp, t_ids = ctx.saved_tensors
        temperature, missing_mass, chunk, dtype = ctx.cfg
        grad = torch.zeros_like(flat)  # (T, V): the one full-size buffer, which autograd needs anyway
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            with torch.enable_grad():
                z = flat.index_select(0, r).detach().to(dtype).requires_grad_(True)  # (c, V)
                loss = token_kl(z, t_lp[s:s + chunk], t_ids[s:s + chunk], temperature, missing_mass).sum()
                (g,) = torch.autograd.grad(loss, z)
            grad.index_copy_(0, r, (g * grad_out).to(flat.dtype))
        return grad, None, None, None, None, None, None, None


def sparse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
              mask: torch.Tensor, temperature: float, missing_mass: MissingMass = "renormalize",
              chunk_tokens: int = 1024) -> torch.Tensor:
    """T^2 * mean over valid tokens of KL_T(teacher || student), teacher known by its top-k only.

    student_logits (N, L, V) any float dtype (computed in >= fp32); teacher_logprobs (N, L, k) = top-k of
    log_softmax(teacher_logits / T); teacher_ids (N, L, k) int; mask (N, L) bool, True at label positions.
    Returns a scalar (fp32, or fp64 for fp64 logits); gradient flows to `student_logits` only.
    """
    if missing_mass not in ("renormalize", "bucket"):
        raise ValueError(f"sparse_kl: missing_mass must be 'renormalize' or 'bucket', got {missing_mass!r}")
    if not temperature > 0:
        raise ValueError(f"sparse_kl: temperature must be > 0, got {temperature}")
    N, L, V = student_logits.shape
    if teacher_logprobs.shape[:2] != (N, L) or teacher_ids.shape != teacher_logprobs.shape or mask.shape != (N, L):
        raise ValueError(f"sparse_kl: shapes disagree: student {tuple(student_logits.shape)}, teacher logprobs "
                         f"{tuple(teacher_logprobs.shape)}, ids {tuple(teacher_ids.shape)}, mask {tuple(mask.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    flat = student_logits.reshape(N * L, V)  # a view for contiguous logits
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # (M,) valid token rows
    k = teacher_ids.shape[-1]
    t_lp = teacher_logprobs.reshape(N * L, k).index_select(0, rows).to(dtype).detach()  # (M, k)
    t_ids = teacher_ids.reshape(N * L, k).index_select(0, rows).long()  # (M, k)
    total = _SparseKL.apply(flat, rows, t_lp, t_ids, float(temperature), missing_mass, max(1, int(chunk_tokens)), dtype)
    return total * (temperature ** 2) / max(rows.numel(), 1)


def dense_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Reference: T^2 * mean over valid tokens of KL(softmax(t/T) || softmax(s/T)), full vocabulary, plain autograd."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_lp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (N, L, V)
    t_lp = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (N, L, V)
    per_tok = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # (N, L)
    m = mask.to(dtype)
    return (per_tok * m).sum() * temperature ** 2 / m.sum().clamp_min(1)
