"""KL_T(teacher || student) estimated from a sampled teacher row: ids, the teacher's log-probs there, and weights.

A sampled cache row (teacher_rows.py: modes "sampled" and "priority") gives, per label position, slots j with an id
i_j, the teacher's log p(i_j) at temperature T and a weight w_j with E[sum_j w_j 1{i_j = i}] = p_i for every
vocabulary id i (an unbiased estimate of the teacher's distribution). The estimate per position is

    KL_hat = sum_j w_j (log p(i_j) - log q(i_j)),       q = softmax(student_logits / T) over the FULL vocabulary,

and the loss is T^2 * mean over valid positions of KL_hat (the same scaling as `sparse_kl.dense_kl`).

What is unbiased. KL_hat is linear in the weights, so over the sampling of the cache rows (the student and the
teacher's log-probs held fixed):
  - the value:    E[KL_hat] = sum_i p_i (log p_i - log q_i) = KL_T(p || q), exactly, per position (so the batch loss
                  is an unbiased estimate of the dense loss on the same positions);
  - the gradient: dKL_hat/dz = (1/T) ((sum_j w_j) q - sum_j w_j e_{i_j}), whose expectation is (1/T)(q - p), the
                  gradient of the dense KL w.r.t. the student logits z; gradients w.r.t. any parameter upstream of z
                  are linear in it, so they are unbiased too.
It needs the teacher's log-probs at the sampled ids (stored), not only ids and counts: ids and counts alone estimate
the cross-entropy sum_i p_i log q_i (the gradient is the same), and the KL value would then need the teacher's
entropy, whose sampled estimate has a far larger variance than that of the log-ratio above.
Not covered: the cache is drawn once, so its noise is the same at every epoch (unbiased over cache draws, not fresh
noise per step), and log p is stored as float16 (a zero-mean rounding of at most 2^-11 |log p| per slot).

Weights (all unbiased):
  `count_weights`     sampled mode, Hansen-Hurwitz: w = count / N (Anshumann et al. 2025, RS-KD with q = p);
  `distinct_weights`  sampled mode, Horvitz-Thompson over the distinct ids: w = p / (1 - (1 - p)^N), where
                      1 - (1 - p)^N is the chance an id is drawn at least once (ignores how often);
  `priority_weights`  priority mode: w = max(p, tau) (Duffield, Lund & Thorup 2007).

Memory: like sparse_kl, a custom autograd Function over chunks of valid tokens; the forward keeps only the per-token
log-normaliser, and the backward is written by hand (the gradient above), one chunk's (c, V) softmax at a time.
"""
from __future__ import annotations

import torch


def count_weights(counts: torch.Tensor, num_samples: int) -> torch.Tensor:
    """counts (..., N) of N draws from p -> w = counts / N."""
    return counts.to(torch.float32) / float(num_samples)


def distinct_weights(logprobs: torch.Tensor, counts: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Horvitz-Thompson weights of the distinct drawn ids: p / P(drawn at least once in N draws); 0 on padding."""
    lp = logprobs.to(torch.float64)
    incl = -torch.expm1(num_samples * torch.log1p(-lp.exp().clamp_max(1.0 - 1e-16)))  # 1 - (1 - p)^N, accurate
    w = torch.where(counts > 0, lp.exp() / incl.clamp_min(1e-300), torch.zeros_like(lp))
    return w.to(torch.float32)


def priority_weights(logprobs: torch.Tensor, log_threshold: torch.Tensor) -> torch.Tensor:
    """logprobs (..., k) of the kept ids, log_threshold (..., 1) = log tau -> w = max(p, tau)."""
    return torch.maximum(logprobs.to(torch.float32), log_threshold.to(torch.float32)).exp()


def token_kl(z: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor, w: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Per-token KL_hat (no T^2): z (c, V) student logits; t_lp, t_ids, w (c, s) -> (c,). Differentiable in z (the
    autograd reference that the hand-written backward is tested against)."""
    zt = z / temperature
    s_lp = zt.gather(-1, t_ids) - torch.logsumexp(zt, dim=-1, keepdim=True)  # (c, s)
    return torch.where(w > 0, w * (t_lp - s_lp), torch.zeros_like(s_lp)).sum(-1)


class _WeightedKL(torch.autograd.Function):
    """Sum over selected rows of KL_hat, chunked; hand-written backward (flat memory)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, rows: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor,
                w: torch.Tensor, temperature: float, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        # flat (T, V) student logits; rows (M,) valid token rows; t_lp, t_ids, w (M, s)
        total = torch.zeros((), dtype=dtype, device=flat.device)
        lse = torch.empty(rows.numel(), dtype=dtype, device=flat.device)  # (M,) log-normaliser of z / T
        for s in range(0, rows.numel(), chunk):
            zt = flat.index_select(0, rows[s:s + chunk]).to(dtype) / temperature  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(zt, dim=-1)
            s_lp = zt.gather(-1, t_ids[s:s + chunk]) - lse[s:s + chunk, None]  # (c, s)
            ws = w[s:s + chunk]
            total = total + torch.where(ws > 0, ws * (t_lp[s:s + chunk] - s_lp), torch.zeros_like(s_lp)).sum()
        ctx.save_for_backward(flat, rows, t_ids, w, lse)
        ctx.cfg = (temperature, chunk, dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        flat, rows, t_ids, w, lse = ctx.saved_tensors
        temperature, chunk, dtype = ctx.cfg
        grad = torch.zeros_like(flat)  # (T, V)
        scale = grad_out.to(dtype) / temperature
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            ws = w[s:s + chunk]  # (c, s)
            q = torch.exp(flat.index_select(0, r).to(dtype) / temperature - lse[s:s + chunk, None])  # (c, V) student
            g = q * ws.sum(-1, keepdim=True)  # (sum_j w_j) q
            g.scatter_add_(-1, t_ids[s:s + chunk], -ws)  # - sum_j w_j e_{i_j}
            grad.index_copy_(0, r, (g * scale).to(flat.dtype))
        return grad, None, None, None, None, None, None, None


def weighted_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                weights: torch.Tensor, mask: torch.Tensor, temperature: float,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """T^2 * mean over valid tokens of KL_hat (module docstring): an unbiased estimate of `dense_kl`'s value and of
    its gradient w.r.t. `student_logits`.

    student_logits (N, L, V) any float dtype (computed in >= fp32); teacher_logprobs, teacher_ids, weights (N, L, s)
    (log p at T of the slot's id, the id, its weight; weight 0 marks padding); mask (N, L) bool. Returns a scalar;
    gradient flows to `student_logits` only.
    """
    if not temperature > 0:
        raise ValueError(f"weighted_kl: temperature must be > 0, got {temperature}")
    N, L, V = student_logits.shape
    if teacher_logprobs.shape[:2] != (N, L) or teacher_ids.shape != teacher_logprobs.shape \
            or weights.shape != teacher_logprobs.shape or mask.shape != (N, L):
        raise ValueError(f"weighted_kl: shapes disagree: student {tuple(student_logits.shape)}, teacher logprobs "
                         f"{tuple(teacher_logprobs.shape)}, ids {tuple(teacher_ids.shape)}, weights "
                         f"{tuple(weights.shape)}, mask {tuple(mask.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    flat = student_logits.reshape(N * L, V)
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # (M,)
    s = teacher_ids.shape[-1]

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(N * L, s).index_select(0, rows)

    t_lp, t_ids, w = pick(teacher_logprobs).to(dtype).detach(), pick(teacher_ids).long(), pick(weights).to(dtype)
    total = _WeightedKL.apply(flat, rows, t_lp, t_ids, w.detach(), float(temperature), max(1, int(chunk_tokens)),
                              dtype)
    return total * (temperature ** 2) / max(rows.numel(), 1)
