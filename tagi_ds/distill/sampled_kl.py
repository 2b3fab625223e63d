"""KL_T(teacher || student) estimated from a sampled teacher row: ids, the teacher's log-probs there, and weights.

A sampled cache row (teacher_rows.py: modes "sampled" and "priority") gives, per label position, slots j with an id
i_j, the teacher's log p(i_j) at temperature T and a weight w_j with E[sum_j w_j 1{i_j = i}] = p_i for every
vocabulary id i (an unbiased estimate of the teacher's distribution). With q = softmax(student_logits / T) over the
FULL vocabulary and r_j = q(i_j) / p(i_j), the estimate per position is

    KL_hat = X + c Y,   X = sum_j w_j (log p(i_j) - log q(i_j)),   Y = sum_j w_j (r_j - 1),

and the loss is T^2 * mean over valid positions of KL_hat (the same scaling as `sparse_kl.dense_kl`).

What is unbiased (over the cache's random draws; the student and the teacher's log-probs held fixed):
  - the value:    E[X] = sum_i p_i (log p_i - log q_i) = KL_T(p || q) and E[Y] = sum_i q_i - sum_i p_i = 0, so
                  E[KL_hat] = KL_T(p || q) per position, for any coefficient c not computed from that position's
                  own draws (`control_coefficients`);
  - the gradient: dKL_hat/dz = (1/T)(sum_j a_j e_{i_j} - (sum_j a_j) q) with a_j = w_j (c r_j - 1), whose expectation
                  is (1/T)(q - p), the gradient of the dense KL w.r.t. the student logits z; gradients w.r.t.
                  parameters upstream of z are linear in it, so they are unbiased too.
Both need the teacher's log-probs at the drawn ids (stored), not only ids and counts: ids and counts alone give
the cross-entropy's gradient but not the KL's value, and no control variate.
Not covered: the cache is drawn once, so its noise is the same at every epoch (unbiased over cache draws, not fresh
noise per step), and log p is stored as float16 (a zero-mean rounding of at most 2^-11 |log p| per slot).

Weights (all unbiased):
  `count_weights`     sampled mode, Hansen-Hurwitz: w = count / N (Anshumann et al. 2025, RS-KD with q = p);
  `distinct_weights`  sampled mode, Horvitz-Thompson over the distinct ids: w = p / (1 - (1 - p)^N), where
                      1 - (1 - p)^N is the chance an id is drawn at least once (ignores how often; lower variance);
  `priority_weights`  priority mode: w = max(p, tau) (Duffield, Lund & Thorup 2007).

Memory: like sparse_kl, a custom autograd Function over chunks of valid tokens; the forward keeps only the per-token
log-normaliser, and the backward is written by hand (the gradient above), one chunk's (c, V) softmax at a time.
"""
from __future__ import annotations

from typing import Union

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


Control = Union[float, str]  # a fixed coefficient, or "auto" (leave-one-out regression, `control_coefficients`)
AUTO_RANGE = (0.0, 2.0)  # the "auto" coefficient is clamped to this range


def token_terms(z: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor,
                w: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (X, Y) (c,) each, no T^2: X = sum_j w_j (log p_j - log q_j), the plain estimate, and
    Y = sum_j w_j (q_j / p_j - 1), the zero-mean control variate. z (c, V) student logits; t_lp, t_ids, w (c, s).
    Differentiable in z (the autograd reference of the hand-written backward)."""
    zt = z / temperature
    s_lp = zt.gather(-1, t_ids) - torch.logsumexp(zt, dim=-1, keepdim=True)  # (c, s)
    keep = w > 0  # padding (and ids the teacher gives probability 0) never enter, even as 0 * inf
    zero = torch.zeros_like(s_lp)
    x = torch.where(keep, w * (t_lp - s_lp), zero).sum(-1)
    y = torch.where(keep, w * torch.expm1(torch.where(keep, s_lp - t_lp, zero)), zero).sum(-1)
    return x, y


def control_coefficients(x: torch.Tensor, y: torch.Tensor, control: Control) -> torch.Tensor:
    """Per-token coefficient (c,) of the control variate, never a function of the token's own draws.

    "auto": c_t = -cov(x, y) / E[y^2] over the OTHER tokens s != t of the call (x centred on their mean; y has known
    mean 0), clamped to AUTO_RANGE; 0 with fewer than 3 tokens. The cache's draws at different positions are
    independent, so c_t is independent of token t's draws and E[c_t Y_t] = E[c_t] E[Y_t] = 0: value and gradient
    stay unbiased, while c_t follows the student (near 0 far from the teacher, near 1 close to it).
    """
    if control != "auto":
        return torch.full_like(x, float(control))
    dtype = x.dtype
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    m = x.numel()
    if m < 3:
        return torch.zeros_like(x, dtype=dtype)
    mean_x = (x.sum() - x) / (m - 1)  # (c,) leave-one-out means
    sxy = ((x * y).sum() - x * y) - mean_x * (y.sum() - y)  # sum_{s != t} (x_s - mean_x) y_s
    syy = (y * y).sum() - y * y  # sum_{s != t} y_s^2
    ok = syy > 1e-12 * (y * y).sum().clamp_min(1e-300)
    c = torch.where(ok, -sxy / torch.where(ok, syy, torch.ones_like(syy)), torch.zeros_like(syy))
    return c.clamp(*AUTO_RANGE).to(dtype)


def token_kl(z: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor, w: torch.Tensor, temperature: float,
             control: Control = 0.0) -> torch.Tensor:
    """Per-token KL_hat + c * Y (no T^2) -> (c,); `control` as in `weighted_kl` ("auto" pools these c tokens)."""
    x, y = token_terms(z, t_lp, t_ids, w, temperature)
    return x + control_coefficients(x, y, control) * y


class _WeightedKL(torch.autograd.Function):
    """Sum over selected rows of KL_hat + c Y, chunked; hand-written backward (flat memory)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, rows: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor,
                w: torch.Tensor, temperature: float, control: Control, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        # flat (T, V) student logits; rows (M,) valid token rows; t_lp, t_ids, w (M, s)
        M = rows.numel()
        lse = torch.empty(M, dtype=dtype, device=flat.device)  # (M,) log-normaliser of z / T
        x, y = torch.empty_like(lse), torch.empty_like(lse)  # (M,) per-token estimate and control variate
        for s in range(0, M, chunk):
            zt = flat.index_select(0, rows[s:s + chunk]).to(dtype) / temperature  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(zt, dim=-1)
            x[s:s + chunk], y[s:s + chunk] = token_terms(zt, t_lp[s:s + chunk], t_ids[s:s + chunk], w[s:s + chunk],
                                                         1.0)
        coef = control_coefficients(x, y, control)  # (M,)
        ctx.save_for_backward(flat, rows, t_lp, t_ids, w, lse, coef)
        ctx.cfg = (temperature, chunk, dtype)
        return (x + coef * y).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        flat, rows, t_lp, t_ids, w, lse, coef = ctx.saved_tensors
        temperature, chunk, dtype = ctx.cfg
        grad = torch.zeros_like(flat)  # (T, V)
        scale = grad_out.to(dtype) / temperature
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            zt = flat.index_select(0, r).to(dtype) / temperature  # (c, V)
            q = torch.exp(zt - lse[s:s + chunk, None])  # (c, V) student probabilities
            ws, ids = w[s:s + chunk], t_ids[s:s + chunk]
            # slot j adds a_j (e_j - q) with a_j = w_j (c q_j / p_j - 1): d/dz of -log q_j is -(e_j - q), of
            # q_j / p_j it is (q_j / p_j)(e_j - q) (both / T)
            keep = ws > 0
            log_ratio = torch.where(keep, zt.gather(-1, ids) - lse[s:s + chunk, None] - t_lp[s:s + chunk], 0.0)
            a = torch.where(keep, ws * (coef[s:s + chunk, None] * torch.exp(log_ratio) - 1.0), 0.0)  # (c, s)
            g = q * (-a.sum(-1, keepdim=True))
            g.scatter_add_(-1, ids, a)
            grad.index_copy_(0, r, (g * scale).to(flat.dtype))
        return grad, None, None, None, None, None, None, None, None


def weighted_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                weights: torch.Tensor, mask: torch.Tensor, temperature: float, control: Control = "auto",
                chunk_tokens: int = 1024) -> torch.Tensor:
    """T^2 * mean over valid tokens of KL_hat (module docstring): an unbiased estimate of `dense_kl`'s value and of
    its gradient w.r.t. `student_logits`.

    `control` c adds c * Y = c * sum_j w_j (q_j / p_j - 1) to KL_hat: E[Y] = sum_i q_i - sum_i p_i = 0 whatever the
    student, so value and gradient stay unbiased for any c that does not depend on the token's own draws. With c = 1
    each slot's term is r - 1 - log r >= 0 (r = q_j / p_j; Schulman's "k3" KL estimator), which vanishes as the
    student approaches the teacher: the noise then shrinks with the KL instead of staying at the size of log p. Far
    from the teacher (r large on the student's favourite ids) c = 1 adds noise; "auto" (`control_coefficients`)
    picks c per token from the other tokens of the call, 0 switches the control variate off.

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
    if control != "auto":
        control = float(control)
    total = _WeightedKL.apply(flat, rows, t_lp, t_ids, w.detach(), float(temperature), control,
                              max(1, int(chunk_tokens)), dtype)
    return total * (temperature ** 2) / max(rows.numel(), 1)
