"""Fused hypernetwork head in Triton: one GEMM for all (task, layer) rows of one module type, writing A and B
directly in PEFT layout; forward and backward. Same contract as `reference.hyper_head`.

out[m, p] = Σ_k h[m, k] · W[p, k] + bias[p] with m = (task, layer) and p over r·d_in (A, row-major (r, d_in)) then
d_out·r (B, row-major (d_out, r)). The epilogue adds the bias and stores columns p < r·d_in into A and the rest into
B, both contiguous (n_tasks, n_layers, …): `A[:, layer]` is then a strided view that the LoRA kernel reads as is, so
nothing is reshaped, transposed or copied between the head and the LoRA layers.

The head is memory-bound on W (P × d_h with P = r·(d_in + d_out), ~10⁵ rows): programs are ordered with the row block
fastest so the programs that share one W tile run together and W is read from HBM about once.
Backward: grad_h = dOut·W with the P reduction split across programs (M is small, P is large) and fp32 atomic adds;
grad_W = dOutᵀ·h and grad_bias = Σ_m dOut in one kernel. dOut is never materialised: tiles are read from dA and dB.

Status: correct (tests/kernels), but on H100 cuBLAS's F.linear ran this GEMM 2.3-6.2x faster (bench/kernels.py), so
dispatch's "auto" keeps the head on the reference (dispatch.HEAD_AUTO_BACKEND); backend="triton" selects this one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_lora import _pow2, _precision


@triton.jit
def _load_dout(da_ptr, db_ptr, offs_m, offs_p, M, P_A, P, TRANSPOSED: tl.constexpr):
    """A (BM, BP) tile of dOut = [dA | dB] (or (BP, BM) when TRANSPOSED), read from the two gradient buffers."""
    if TRANSPOSED:
        m2 = offs_m[None, :]
        p2 = offs_p[:, None]
    else:
        m2 = offs_m[:, None]
        p2 = offs_p[None, :]
    m_ok = m2 < M
    in_a = p2 < P_A
    in_b = (p2 >= P_A) & (p2 < P)
    # plain offsets (masked lanes may point outside a buffer, which masked accesses allow): a tl.where here hid the
    # contiguity from the compiler and made every access scalar
    ta = tl.load(da_ptr + m2 * P_A + p2, mask=m_ok & in_a, other=0.0)
    tb = tl.load(db_ptr + m2 * (P - P_A) + (p2 - P_A), mask=m_ok & in_b, other=0.0)
    return ta + tb


@triton.jit
def _head_fwd_kernel(h_ptr, w_ptr, bias_ptr, a_ptr, b_ptr,
                     M, P_A, P, K, shm, shk, swp, swk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # row block fastest: neighbours share the W tile (L2 reuse)
    pid_n = pid // num_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < P
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ht = tl.load(h_ptr + offs_m[:, None] * shm + offs_k[None, :] * shk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        wt = tl.load(w_ptr + offs_n[None, :] * swp + offs_k[:, None] * swk,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(ht.dtype)  # (BK, BN) = Wᵀ tile
        acc = tl.dot(ht, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = acc.to(a_ptr.dtype.element_ty)
    in_a = offs_n < P_A
    in_b = (offs_n >= P_A) & n_mask
    tl.store(a_ptr + offs_m[:, None] * P_A + offs_n[None, :], out, mask=m_mask[:, None] & in_a[None, :])
    tl.store(b_ptr + offs_m[:, None] * (P - P_A) + (offs_n - P_A)[None, :], out, mask=m_mask[:, None] & in_b[None, :])


@triton.jit
def _head_bwd_h_kernel(da_ptr, db_ptr, w_ptr, gh_ptr,
                       M, P_A, P, K, swp, swk, P_PER_SPLIT,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                       PRECISION: tl.constexpr):
    """grad_h[m, k] += Σ_{p in this split} dOut[m, p] · W[p, k]; gh is fp32 (M, K), zeroed."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    p_start = tl.program_id(2).to(tl.int64) * P_PER_SPLIT
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, P_PER_SPLIT, BLOCK_P):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_P)
        dout = _load_dout(da_ptr, db_ptr, offs_m, offs_p, M, P_A, P, TRANSPOSED=False)  # (BM, BP)
        wt = tl.load(w_ptr + offs_p[:, None] * swp + offs_k[None, :] * swk,
                     mask=(offs_p < P)[:, None] & k_mask[None, :], other=0.0).to(dout.dtype)  # (BP, BK)
        acc = tl.dot(dout, wt, acc, input_precision=PRECISION)
    tl.atomic_add(gh_ptr + offs_m[:, None] * K + offs_k[None, :], acc,
                  mask=(offs_m < M)[:, None] & k_mask[None, :])


@triton.jit
def _head_bwd_w_kernel(da_ptr, db_ptr, h_ptr, gw_ptr, gb_ptr,
                       M, P_A, P, K, shm, shk,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """grad_W[p, k] = Σ_m dOut[m, p] · h[m, k]; grad_bias[p] = Σ_m dOut[m, p] (written by the k-block 0 programs)."""
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    p_mask = offs_p < P
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dout_t = _load_dout(da_ptr, db_ptr, offs_m, offs_p, M, P_A, P, TRANSPOSED=True)  # (BP, BM)
        ht = tl.load(h_ptr + offs_m[:, None] * shm + offs_k[None, :] * shk,
                     mask=(offs_m < M)[:, None] & k_mask[None, :], other=0.0).to(dout_t.dtype)  # (BM, BK)
        acc = tl.dot(dout_t, ht, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bacc += tl.sum(dout_t.to(tl.float32), axis=1)
    tl.store(gw_ptr + offs_p[:, None] * K + offs_k[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=p_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(gb_ptr + offs_p, bacc.to(gb_ptr.dtype.element_ty), mask=p_mask)


HEAD_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _head_cfg(m: int) -> dict:
    cfg = dict(HEAD_BLOCKS)
    cfg["BLOCK_M"] = _pow2(m, 16, cfg["BLOCK_M"])
    return cfg


def head_forward(h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p_a: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """h2 (M, K) → A_flat (M, p_a), B_flat (M, P - p_a), both contiguous in h2's dtype."""
    m, k = h2.shape
    p = weight.shape[0]
    a = torch.empty((m, p_a), device=h2.device, dtype=h2.dtype)
    b = torch.empty((m, p - p_a), device=h2.device, dtype=h2.dtype)
    if m == 0:
        return a, b
    cfg = _head_cfg(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_N"]),)
    _head_fwd_kernel[grid](h2, weight, bias if bias is not None else weight, a, b,
                           m, p_a, p, k, *h2.stride(), *weight.stride(),
                           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                           HAS_BIAS=bias is not None, PRECISION=_precision(h2.dtype, h2.device),
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return a, b


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep it fast


def head_backward(da: torch.Tensor, db: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                  need_h: bool, need_w: bool, need_b: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the head given dA_flat (M, p_a) and dB_flat (M, P - p_a), contiguous."""
    m, k = h2.shape
    p, p_a = weight.shape[0], da.shape[1]
    cfg = _head_cfg(m)
    prec = _precision(h2.dtype, h2.device)
    gh = gw = gb = None
    if need_h:
        gh32 = torch.zeros((m, k), device=h2.device, dtype=torch.float32)
        if m > 0:
            n_m, n_k = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_K"])
            block_p = cfg["BLOCK_N"]
            # split P so that about 4 programs per SM are in flight (M·K alone gives only a handful)
            splits = max(1, min(triton.cdiv(p, block_p), (4 * _sm_count(h2.device)) // (n_m * n_k)))
            per_split = triton.cdiv(triton.cdiv(p, splits), block_p) * block_p
            splits = triton.cdiv(p, per_split)
            _head_bwd_h_kernel[(n_m, n_k, splits)](
                da, db, weight, gh32, m, p_a, p, k, *weight.stride(), per_split,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=block_p, PRECISION=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        gh = gh32.to(h2.dtype)
    if need_w or need_b:
        gw = torch.empty((p, k), device=h2.device, dtype=weight.dtype)
        gb = torch.empty((p,), device=h2.device, dtype=weight.dtype) if has_bias else None
        if m == 0:
            gw.zero_()
            if gb is not None:
                gb.zero_()
        else:
            block_p = cfg["BLOCK_N"]
            _head_bwd_w_kernel[(triton.cdiv(p, block_p), triton.cdiv(k, cfg["BLOCK_K"]))](
                da, db, h2, gw, gb if gb is not None else gw,
                m, p_a, p, k, *h2.stride(),
                BLOCK_P=block_p, BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"],
                HAS_BIAS=has_bias, PRECISION=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return gh, (gw if need_w else None), (gb if need_b else None)


class HyperHead(torch.autograd.Function):
    """Autograd wrapper over the fused head; returns A (n_tasks, n_layers, r, d_in), B (n_tasks, n_layers, d_out, r)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: int, d_in: int,
                d_out: int):
        n_tasks, n_layers, d_h = h.shape
        h2 = h.reshape(n_tasks * n_layers, d_h)  # a view for the usual contiguous trunk output
        a, b = head_forward(h2, weight, bias, r * d_in)
        ctx.save_for_backward(h2, weight)
        ctx.has_bias = bias is not None
        ctx.h_shape = h.shape
        ctx.p_a = r * d_in
        return a.view(n_tasks, n_layers, r, d_in), b.view(n_tasks, n_layers, d_out, r)

    @staticmethod
    def backward(ctx, da: torch.Tensor | None, db: torch.Tensor | None):
        h2, weight = ctx.saved_tensors
        m = h2.shape[0]
        p, p_a = weight.shape[0], ctx.p_a
        # an A or B that fed no loss arrives as None: zeros give the same gradient
        da = (da.reshape(m, -1).contiguous() if da is not None
              else torch.zeros((m, p_a), device=h2.device, dtype=h2.dtype))
        db = (db.reshape(m, -1).contiguous() if db is not None
              else torch.zeros((m, p - p_a), device=h2.device, dtype=h2.dtype))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw, gb = head_backward(da, db, h2, weight, ctx.has_bias, need_h, need_w, need_b and ctx.has_bias)
        if gh is not None:
            gh = gh.view(ctx.h_shape)
        return gh, gw, gb, None, None, None


def hyper_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: int, d_in: int, d_out: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.hyper_head`; differentiable in h, weight and bias."""
    return HyperHead.apply(h, weight, bias, int(r), int(d_in), int(d_out))
