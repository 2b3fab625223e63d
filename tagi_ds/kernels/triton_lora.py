"""Fused segmented batched LoRA (SGMV pattern) in Triton: forward and backward, same semantics as
`reference.segmented_lora`.

y[n, t] = s · B_{task(n)} (A_{task(n)} x[n, t]), PEFT layout A (n_tasks, r, d_in), B (n_tasks, d_out, r).

Why one fused forward kernel: a program owns BLOCK_M tokens of one batch row (so one task), computes the rank-r
intermediate h = x·Aᵀ in registers (shrink), then sweeps d_out writing y = s·h·Bᵀ (expand). x is read once and y
written once; h never round-trips through device memory, and A_t / B_t tiles are tiny and stay in L2. Rows may be
in any task order and tasks may own different numbers of rows (ragged): a row's tokens always share a task, so no
sort or segment table is needed. A and B may be strided views (e.g. `A_all[:, layer]` from the hypernetwork head).

Backward: one kernel per token tile computes dh = s·dy·B_t and dx = dh·A_t (dy read once, dx written once); a second
kernel reduces the weight gradients per row (dA_t += dhᵀ·x, dB_t += s·dyᵀ·h) into fp32 buffers with atomic adds,
so the sum order over rows of one task is not deterministic (differences at rounding level only).

Matmul precision follows torch: fp32 inputs keep fp32 accuracy (IEEE dots, see FP32_HIGHEST_DOT)
unless `torch.get_float32_matmul_precision()` allows TF32; bf16/fp16 inputs use the tensor cores with fp32
accumulation. Like the reference, h is rounded to x's dtype before the expand.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# fp32 dots at torch's "highest" precision: IEEE fp32 on the FMA units. Measured on H100 (bench/kernels.py): the
# fused fp32 LoRA forward then runs at 0.60x cuBLAS's speed (bf16, the production dtype, is 2.06x faster). "tf32x3"
# (three TF32 tensor-core passes, ~fp32 accuracy) passed the 1e-5 LoRA tests on H100 but is not the default: at the
# head's block sizes it needs 256 KB of shared memory (OutOfResources, limit 227 KB) and its speed is unmeasured.
FP32_HIGHEST_DOT = "ieee"


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """Triton dot precision that matches what torch.matmul would do for this dtype."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return FP32_HIGHEST_DOT if device.type == "cuda" else "ieee"  # the interpreter computes in numpy
    return "tf32"  # ignored by Triton for 16-bit inputs


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


@triton.jit
def _fwd_kernel(x_ptr, a_ptr, b_ptr, tid_ptr, y_ptr, h_ptr,
                T, D_IN, D_OUT, R,
                sxn, sxt, sxk, sat, sar, sak, sbt, sbo, sbr, syn, syt, syo,
                scale,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                STORE_H: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BLOCK_M)
    n = (pid // tiles_t).to(tl.int64)
    offs_m = (pid % tiles_t) * BLOCK_M + tl.arange(0, BLOCK_M)  # token positions in row n
    m_mask = offs_m < T
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    task = tl.load(tid_ptr + n).to(tl.int64)
    x_row = x_ptr + n * sxn
    a_task = a_ptr + task * sat
    b_task = b_ptr + task * sbt

    # shrink: h = x · A_tᵀ, (BLOCK_M, BLOCK_R) in fp32 registers
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D_IN
        xt = tl.load(x_row + offs_m[:, None] * sxt + offs_k[None, :] * sxk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        at = tl.load(a_task + offs_k[:, None] * sak + offs_r[None, :] * sar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(xt.dtype)  # (BK, BR) = A_tᵀ tile
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    if STORE_H:  # saved for dB in the backward: h is (N, T, R) fp32, contiguous
        h_ptrs = h_ptr + (n * T + offs_m[:, None]) * R + offs_r[None, :]
        tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])
    hq = acc.to(y_ptr.dtype.element_ty)  # same rounding point as the reference's bmm

    # expand: y = s · h · B_tᵀ, one BLOCK_N slab of d_out at a time
    y_row = y_ptr + n * syn
    for o0 in range(0, D_OUT, BLOCK_N):
        offs_o = o0 + tl.arange(0, BLOCK_N)
        o_mask = offs_o < D_OUT
        bt = tl.load(b_task + offs_r[:, None] * sbr + offs_o[None, :] * sbo,
                     mask=r_mask[:, None] & o_mask[None, :], other=0.0).to(hq.dtype)  # (BR, BN) = B_tᵀ tile
        y = tl.dot(hq, bt, input_precision=PRECISION) * scale
        tl.store(y_row + offs_m[:, None] * syt + offs_o[None, :] * syo, y.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & o_mask[None, :])


@triton.jit
def _bwd_dx_kernel(dy_ptr, a_ptr, b_ptr, tid_ptr, dx_ptr, dh_ptr,
                   T, D_IN, D_OUT, R,
                   sdn, sdt, sdo, sat, sar, sak, sbt, sbo, sbr, sxn, sxt, sxk,
                   scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BLOCK_M)
    n = (pid // tiles_t).to(tl.int64)
    offs_m = (pid % tiles_t) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    task = tl.load(tid_ptr + n).to(tl.int64)
    dy_row = dy_ptr + n * sdn

    # dh = s · dy · B_t, (BLOCK_M, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_N):
        offs_o = o0 + tl.arange(0, BLOCK_N)
        o_mask = offs_o < D_OUT
        dyt = tl.load(dy_row + offs_m[:, None] * sdt + offs_o[None, :] * sdo,
                      mask=m_mask[:, None] & o_mask[None, :], other=0.0)  # (BM, BN)
        bt = tl.load(b_ptr + task * sbt + offs_o[:, None] * sbo + offs_r[None, :] * sbr,
                     mask=o_mask[:, None] & r_mask[None, :], other=0.0).to(dyt.dtype)  # (BN, BR)
        acc = tl.dot(dyt, bt, acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(dh_ptr + (n * T + offs_m[:, None]) * R + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])

    if COMPUTE_DX:  # dx = dh · A_t, one BLOCK_K slab of d_in at a time
        dhq = acc.to(dx_ptr.dtype.element_ty)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D_IN
            at = tl.load(a_ptr + task * sat + offs_r[:, None] * sar + offs_k[None, :] * sak,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(dhq.dtype)  # (BR, BK)
            dx = tl.dot(dhq, at, input_precision=PRECISION)
            tl.store(dx_ptr + n * sxn + offs_m[:, None] * sxt + offs_k[None, :] * sxk,
                     dx.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _bwd_dw_kernel(x_ptr, dy_ptr, h_ptr, dh_ptr, tid_ptr, da_ptr, db_ptr,
                   T, D_IN, D_OUT, R,
                   sxn, sxt, sxk, sdn, sdt, sdo,
                   scale, N_KB,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                   DO_A: tl.constexpr, DO_B: tl.constexpr, PRECISION: tl.constexpr):
    """Program (n, c): row n's contribution to one BLOCK_C slab of dA_t (c < N_KB) or of dB_t (c >= N_KB).

    da/db are fp32 (n_tasks, r, d_in) / (n_tasks, d_out, r), contiguous and zeroed; h/dh are (N, T, R) fp32.
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    task = tl.load(tid_ptr + n).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # the two branches use distinct names: Triton requires a name shared by both to have one type
    if c < N_KB:
        if DO_A:  # dA_t[r, k] += Σ_t dh[t, r] · x[t, k]
            offs_k = c * BLOCK_C + tl.arange(0, BLOCK_C)
            k_mask = offs_k < D_IN
            acc_a = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for t0 in range(0, T, BLOCK_M):
                offs_m = t0 + tl.arange(0, BLOCK_M)
                m_mask = offs_m < T
                xt = tl.load(x_ptr + n * sxn + offs_m[:, None] * sxt + offs_k[None, :] * sxk,
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BC)
                dht = tl.load(dh_ptr + (n * T + offs_m[None, :]) * R + offs_r[:, None],
                              mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(xt.dtype)  # (BR, BM)
                acc_a = tl.dot(dht, xt, acc_a, input_precision=PRECISION)
            tl.atomic_add(da_ptr + (task * R + offs_r[:, None]) * D_IN + offs_k[None, :], acc_a,
                          mask=r_mask[:, None] & k_mask[None, :])
    else:
        if DO_B:  # dB_t[o, r] += s · Σ_t dy[t, o] · h[t, r]
            offs_o = (c - N_KB) * BLOCK_C + tl.arange(0, BLOCK_C)
            o_mask = offs_o < D_OUT
            acc_b = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
            for t0 in range(0, T, BLOCK_M):
                offs_m = t0 + tl.arange(0, BLOCK_M)
                m_mask = offs_m < T
                dyt = tl.load(dy_ptr + n * sdn + offs_m[None, :] * sdt + offs_o[:, None] * sdo,
                              mask=o_mask[:, None] & m_mask[None, :], other=0.0)  # (BC, BM)
                ht = tl.load(h_ptr + (n * T + offs_m[:, None]) * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dyt.dtype)  # (BM, BR)
                acc_b = tl.dot(dyt, ht, acc_b, input_precision=PRECISION)
            tl.atomic_add(db_ptr + (task * D_OUT + offs_o[:, None]) * R + offs_r[None, :], acc_b * scale,
                          mask=o_mask[:, None] & r_mask[None, :])


# Block sizes. BLOCK_M shrinks for short rows (a tile never spans two rows); the others are fixed defaults that the
# benchmark can override. BLOCK_R pads the rank to a power of two ≥ 16 (tl.dot's minimum).
DEFAULT_BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


def _blocks(T: int, r: int, overrides: dict | None) -> dict:
    cfg = dict(DEFAULT_BLOCKS)
    if overrides:
        cfg.update(overrides)
    cfg["BLOCK_M"] = _pow2(T, 16, cfg["BLOCK_M"])
    cfg["BLOCK_R"] = _pow2(r, 16, 1024)
    return cfg


def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor, scale: float,
                 store_h: bool, blocks: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (N, T, d_out) in x's dtype, and h = x·A_tᵀ (N, T, r) fp32 when `store_h`."""
    n, t, d_in = x.shape
    r, d_out = A.shape[1], B.shape[1]
    y = torch.empty((n, t, d_out), device=x.device, dtype=x.dtype)
    h = torch.empty((n, t, r), device=x.device, dtype=torch.float32) if store_h else None
    if n == 0 or t == 0:
        return y, h
    cfg = _blocks(t, r, blocks)
    grid = (n * triton.cdiv(t, cfg["BLOCK_M"]),)
    _fwd_kernel[grid](x, A, B, task_ids, y, h if store_h else y,
                      t, d_in, d_out, r,
                      *x.stride(), *A.stride(), *B.stride(), *y.stride(),
                      float(scale),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
                      STORE_H=store_h, PRECISION=_precision(x.dtype, x.device),
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, h


def lora_backward(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor,
                  h: torch.Tensor, scale: float, need_dx: bool, need_da: bool, need_db: bool,
                  blocks: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dA, dB) of y = s·(x A_tᵀ) B_tᵀ given dy; dA/dB in A's/B's dtype, None where not needed."""
    n, t, d_in = x.shape
    r, d_out = A.shape[1], B.shape[1]
    n_tasks = A.shape[0]
    cfg = _blocks(t, r, blocks)
    prec = _precision(x.dtype, x.device)
    dx = torch.empty_like(x) if need_dx else None
    da32 = torch.zeros((n_tasks, r, d_in), device=x.device, dtype=torch.float32) if need_da else None
    db32 = torch.zeros((n_tasks, d_out, r), device=x.device, dtype=torch.float32) if need_db else None
    if n > 0 and t > 0 and (need_dx or need_da or need_db):
        dh = None
        if need_dx or need_da:
            dh = torch.empty((n, t, r), device=x.device, dtype=torch.float32)
            _bwd_dx_kernel[(n * triton.cdiv(t, cfg["BLOCK_M"]),)](
                dy, A, B, task_ids, dx if need_dx else dy, dh,
                t, d_in, d_out, r,
                *dy.stride(), *A.stride(), *B.stride(), *(dx.stride() if need_dx else x.stride()),
                float(scale),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
                COMPUTE_DX=need_dx, PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if need_da or need_db:
            block_c = cfg["BLOCK_K"]
            n_kb = triton.cdiv(d_in, block_c) if need_da else 0
            n_ob = triton.cdiv(d_out, block_c) if need_db else 0
            _bwd_dw_kernel[(n, n_kb + n_ob)](
                x, dy, h, dh if dh is not None else h, task_ids,
                da32 if need_da else h, db32 if need_db else h,
                t, d_in, d_out, r,
                *x.stride(), *dy.stride(),
                float(scale), n_kb,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_C=block_c, BLOCK_R=cfg["BLOCK_R"],
                DO_A=need_da, DO_B=need_db, PRECISION=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    da = da32.to(A.dtype) if need_da else None
    db = db32.to(B.dtype) if need_db else None
    return dx, da, db


class SegmentedLoRA(torch.autograd.Function):
    """Autograd wrapper: gradients flow to x, A and B (A and B come from the hypernetwork)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor,
                scale: float) -> torch.Tensor:
        need_h = B.requires_grad  # h is only read by dB
        y, h = lora_forward(x, A, B, task_ids, scale, store_h=need_h)
        ctx.save_for_backward(x, A, B, task_ids, h if need_h else None)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, A, B, task_ids, h = ctx.saved_tensors
        need_dx, need_da, need_db = ctx.needs_input_grad[:3]
        dx, da, db = lora_backward(dy, x, A, B, task_ids, h, ctx.scale, need_dx, need_da, need_db)
        return dx, da, db, None, None


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, task_ids: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Same contract as `reference.segmented_lora`; differentiable in x, A and B."""
    return SegmentedLoRA.apply(x, A, B, task_ids, float(scale))
