"""Fused Triton kernels vs the torch reference: outputs and gradients, fp32 at 1e-5 relative.

Without a GPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set here, before anything imports
the kernel modules (Triton reads it when a kernel is decorated). On CUDA the compiled kernels are tested, and bf16
too (the interpreter's bf16 arithmetic is not faithful, so bf16 runs only on the GPU).
"""
from __future__ import annotations

import importlib
import os
import sys
import zlib

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from tagi_ds.kernels import dispatch, reference  # noqa: E402


def _kernel_modules():
    """The kernel modules, re-decorated under the interpreter if someone imported them earlier without it."""
    mods = [importlib.import_module("tagi_ds.kernels.triton_lora"),
            importlib.import_module("tagi_ds.kernels.triton_hyperhead")]
    if not CUDA and type(mods[0]._fwd_kernel).__name__ != "InterpretedFunction":
        mods = [importlib.reload(m) for m in mods]
    return mods


triton_lora, triton_hyperhead = _kernel_modules()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = _rel_err(out, ref)
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"
    # elementwise too, so one wrong element cannot hide in a large norm
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * ref.abs().max().item())


def _lora_case(gen, n_tasks, task_ids, t, d_in, d_out, r, dtype=torch.float32, layer_view=False):
    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    x = rnd(len(task_ids), t, d_in).requires_grad_()
    if layer_view:  # A/B as strided views of an all-layers tensor, as the hypernetwork head produces them
        A = rnd(n_tasks, 3, r, d_in)[:, 1].requires_grad_()
        B = rnd(n_tasks, 3, d_out, r)[:, 2].requires_grad_()
        assert not A.is_contiguous() and not B.is_contiguous()
    else:
        A = rnd(n_tasks, r, d_in).requires_grad_()
        B = rnd(n_tasks, d_out, r).requires_grad_()
    return x, A, B, torch.tensor(task_ids, device=DEVICE)


LORA_CASES = {
    # name: (n_tasks, task_ids (rows, any order), T, d_in, d_out, r)
    "ragged": (3, [0, 2, 2, 1, 2, 0], 5, 40, 24, 4),   # tasks own 2, 1 and 3 rows
    "single_task": (1, [0, 0, 0], 9, 32, 32, 8),
    "rank1": (2, [1, 0, 1], 6, 24, 20, 1),
    "rank64": (2, [0, 1, 1], 4, 32, 48, 64),
    "long_rows_unused_task": (4, [3, 0, 3], 70, 20, 36, 16),  # 2 token tiles per row; tasks 1, 2 own no rows
}


@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_segmented_lora_matches_reference(name):
    n_tasks, task_ids, t, d_in, d_out, r = LORA_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x, A, B, tid = _lora_case(gen, n_tasks, task_ids, t, d_in, d_out, r, layer_view=(name == "ragged"))
    scale = 0.75
    y = dispatch.segmented_lora(x, A, B, tid, scale, backend="triton")
    y_ref = reference.segmented_lora(x, A, B, tid, scale)
    _close(y, y_ref)

    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, A, B), dy)
    for g, g_ref, what in zip(grads, grads_ref, ("dx", "dA", "dB")):
        if what == "dA" and name == "long_rows_unused_task":
            assert g[1:3].abs().max() == 0  # tasks without rows get exactly zero gradient
        _close(g, g_ref)


def test_segmented_lora_partial_grads():
    """First LoRA layer: x needs no gradient; only A and B do (they come from the hypernetwork)."""
    gen = torch.Generator().manual_seed(1)
    x, A, B, tid = _lora_case(gen, 2, [1, 0, 0], 6, 16, 24, 4)
    x = x.detach()
    y = dispatch.segmented_lora(x, A, B, tid, 2.0, backend="triton")
    y_ref = reference.segmented_lora(x, A, B, tid, 2.0)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    for g, g_ref in zip(torch.autograd.grad(y, (A, B), dy), torch.autograd.grad(y_ref, (A, B), dy)):
        _close(g, g_ref)


HEAD_CASES = {
    # name: (n_tasks, n_layers, d_h, r, d_in, d_out, bias)
    "basic": (3, 2, 24, 4, 20, 28, True),
    "rank1_no_bias": (2, 3, 16, 1, 36, 12, False),
    "rank64": (1, 2, 32, 64, 8, 12, True),
    "many_rows": (5, 15, 20, 2, 24, 24, True),  # M = 75 > one row block of 64
}


@pytest.mark.parametrize("name", sorted(HEAD_CASES))
def test_hyper_head_matches_reference(name):
    n_tasks, n_layers, d_h, r, d_in, d_out, has_bias = HEAD_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    p = r * d_in + d_out * r

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(DEVICE).requires_grad_()
    h, w = rnd(n_tasks, n_layers, d_h), rnd(p, d_h)
    b = rnd(p) if has_bias else None
    A, B = dispatch.hyper_head(h, w, b, r, d_in, d_out, backend="triton")
    A_ref, B_ref = reference.hyper_head(h, w, b, r, d_in, d_out)
    assert A.shape == (n_tasks, n_layers, r, d_in) and B.shape == (n_tasks, n_layers, d_out, r)
    _close(A, A_ref)
    _close(B, B_ref)

    gA, gB = torch.randn(A.shape, generator=gen).to(DEVICE), torch.randn(B.shape, generator=gen).to(DEVICE)
    inputs = (h, w) + ((b,) if has_bias else ())
    grads = torch.autograd.grad((A * gA).sum() + (B * gB).sum(), inputs)
    grads_ref = torch.autograd.grad((A_ref * gA).sum() + (B_ref * gB).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


def test_head_feeds_lora_without_copies():
    """End to end: head → A[:, layer] views → LoRA kernel; gradients reach the head like the reference's."""
    gen = torch.Generator().manual_seed(7)
    n_tasks, n_layers, d_h, r, d = 3, 2, 16, 4, 24
    h = torch.randn(n_tasks, n_layers, d_h, generator=gen).to(DEVICE).requires_grad_()
    w = (0.1 * torch.randn(2 * r * d, d_h, generator=gen)).to(DEVICE).requires_grad_()
    x = torch.randn(4, 5, d, generator=gen).to(DEVICE)
    tid = torch.tensor([2, 0, 2, 1], device=DEVICE)

    def run(backend):
        A, B = dispatch.hyper_head(h, w, None, r, d, d, backend=backend)
        y = sum(dispatch.segmented_lora(x, A[:, layer], B[:, layer], tid, 0.5, backend=backend)
                for layer in range(n_layers))
        return y, torch.autograd.grad((y ** 2).sum(), (h, w))

    y, grads = run("triton")
    y_ref, grads_ref = run("reference")
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


@pytest.mark.skipif(not CUDA, reason="bf16 needs the compiled kernels (the interpreter's bf16 is not faithful)")
def test_bf16_close_to_float64():
    gen = torch.Generator().manual_seed(3)
    x, A, B, tid = _lora_case(gen, 3, [0, 2, 2, 1, 2, 0], 33, 64, 96, 16, dtype=torch.bfloat16)
    y = dispatch.segmented_lora(x, A, B, tid, 0.5, backend="triton")
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, torch.bfloat16)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = reference.segmented_lora(x64, A64, B64, tid, 0.5)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
    assert _rel_err(y, y64) < 1e-2
    for g, g64 in zip(grads, grads64):
        assert g.dtype == torch.bfloat16 and _rel_err(g, g64) < 1e-2


def test_interpreter_flag_is_what_this_module_set():
    """Guards the premise of this file: on CPU the kernels really run interpreted (else they could not run)."""
    kind = type(triton_lora._fwd_kernel).__name__
    assert kind == ("JITFunction" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
                    else "InterpretedFunction")
    assert "tagi_ds.kernels.triton_lora" in sys.modules
