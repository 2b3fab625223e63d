"""L_ins via the r×r Gram expansion against the materialised float64 Frobenius norm."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.distill.l_ins import delta_w_distance, delta_w_distance_dense, l_ins_per_task


def lora(shape: tuple[int, ...], r: int, d_out: int, d_in: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    B = torch.randn(*shape, d_out, r, generator=g, dtype=torch.float64) / r ** 0.5
    return A.to(dtype), B.to(dtype)


def test_equals_dense_reference_batched_and_unnormalised():
    A_g, B_g = lora((3, 2), 4, 48, 40, seed=0)  # (tasks, layers) leading dims
    A_t, B_t = lora((3, 2), 4, 48, 40, seed=1)
    s_t = torch.tensor([2.0, 0.5])  # per layer scale, broadcast over tasks
    for normalize in (True, False):
        got = delta_w_distance(A_g, B_g, 1.5, A_t, B_t, s_t, normalize=normalize)
        want = delta_w_distance_dense(A_g, B_g, 1.5, A_t, B_t, s_t, normalize=normalize)
        assert got.shape == (3, 2) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_nearly_equal_pairs_keep_their_digits():
    """ΔW_g = ΔW_t up to 1e-3 relative: the three Gram terms cancel to 1e-6 of their size; fp64 accumulation keeps
    the answer at rtol 1e-3 of the float64 dense reference, while plain fp32 accumulation misses it by far more."""
    d_out, d_in, r = 256, 192, 8
    A_t, B_t = lora((4,), r, d_out, d_in, seed=2)
    g = torch.Generator().manual_seed(3)
    A_g = (A_t.double() * (1 + 1e-3 * torch.randn(A_t.shape, generator=g, dtype=torch.float64))).float()
    B_g = (B_t.double() * (1 + 1e-3 * torch.randn(B_t.shape, generator=g, dtype=torch.float64))).float()
    want = delta_w_distance_dense(A_g, B_g, 2.0, A_t, B_t, 2.0)  # (4,) ~1e-6
    got = delta_w_distance(A_g, B_g, 2.0, A_t, B_t, 2.0)
    assert got.dtype == torch.float32 and (want > 1e-8).all() and (want < 1e-4).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)
    # the same expansion accumulated in fp32, for the record
    tr = lambda X, Y: (X * Y.transpose(-1, -2)).sum((-2, -1))  # noqa: E731
    tt = tr(B_t.mT @ B_t, A_t @ A_t.mT)
    fp32 = (tr(B_g.mT @ B_g, A_g @ A_g.mT) - 2 * tr(B_t.mT @ B_g, A_g @ A_t.mT) + tt) / tt
    rel32 = ((fp32.double() - want).abs() / want).max().item()
    rel64 = ((got.double() - want).abs() / want).max().item()
    print(f"\nrelative error near convergence: fp64 accumulation {rel64:.2e}, fp32 accumulation {rel32:.2e}")
    assert rel32 > 10 * rel64


def test_invariant_under_reparametrisation_of_the_factors():
    A_g, B_g = lora((2,), 6, 32, 24, seed=4, dtype=torch.float64)
    A_t, B_t = lora((2,), 6, 32, 24, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    base = delta_w_distance(A_g, B_g, 1.0, A_t, B_t, 1.0)
    moved = delta_w_distance(M @ A_g, B_g @ torch.linalg.inv(M), 1.0, A_t, B_t, 1.0)
    moved_t = delta_w_distance(A_g, B_g, 1.0, M @ A_t, B_t @ torch.linalg.inv(M), 1.0)
    torch.testing.assert_close(moved, base, rtol=1e-10, atol=0)
    torch.testing.assert_close(moved_t, base, rtol=1e-10, atol=0)


def test_different_ranks():
    A_g, B_g = lora((3,), 16, 40, 30, seed=7)
    A_t, B_t = lora((3,), 4, 40, 30, seed=8)
    got = delta_w_distance(A_g, B_g, 16 / 16, A_t, B_t, 8 / 4)
    torch.testing.assert_close(got.double(), delta_w_distance_dense(A_g, B_g, 1.0, A_t, B_t, 2.0), rtol=1e-5, atol=0)
    # a rank-16 pair that spans the rank-4 teacher exactly: distance 0
    A_pad = torch.cat([A_t, torch.zeros(3, 12, 30)], dim=1)
    B_pad = torch.cat([B_t, torch.randn(3, 40, 12)], dim=2)
    assert delta_w_distance(A_pad, B_pad, 2.0, A_t, B_t, 2.0).abs().max() < 1e-6


def test_finite_gradient_at_zero_B_and_it_matches_dense():
    A_g, _ = lora((2,), 4, 20, 16, seed=9)
    A_t, B_t = lora((2,), 4, 20, 16, seed=10)
    B_g = torch.zeros(2, 20, 4, requires_grad=True)  # PEFT's initialisation
    A_g.requires_grad_(True)
    loss = delta_w_distance(A_g, B_g, 2.0, A_t, B_t, 2.0).sum()
    torch.testing.assert_close(loss.double(), torch.tensor(2.0, dtype=torch.float64), rtol=1e-6, atol=0)  # = 1 each
    loss.backward()
    assert torch.isfinite(B_g.grad).all() and B_g.grad.abs().sum() > 0
    assert torch.isfinite(A_g.grad).all()
    B_ref = torch.zeros(2, 20, 4, dtype=torch.float64, requires_grad=True)
    delta_w_distance_dense(A_g.detach(), B_ref, 2.0, A_t, B_t, 2.0).sum().backward()
    torch.testing.assert_close(B_g.grad.double(), B_ref.grad, rtol=1e-5, atol=1e-9)


def test_shape_errors_name_the_problem():
    A, B = lora((), 4, 20, 16, seed=0)
    A2, B2 = lora((), 4, 20, 17, seed=0)
    with pytest.raises(ValueError, match="20×16 but the teacher's is 20×17"):
        delta_w_distance(A, B, 1.0, A2, B2, 1.0)


def test_batched_per_task_equals_the_loop_over_tasks_and_module_types():
    """l_ins_per_task (one call per module type) against the finetune's loop (one call per task x module type):
    same values and same gradients w.r.t. the generated factors; module types of different shapes and ranks."""
    n_tasks, L = 4, 3
    shapes = {"q": (32, 32), "ffn_in": (48, 32), "ffn_out": (32, 48)}  # module type -> (d_out, d_in)
    gen, teachers = {}, [({}, s) for s in (2.0, 0.5, 1.0, 4.0)]
    for j, (mt, (d_out, d_in)) in enumerate(shapes.items()):
        A, B = lora((n_tasks, L), 4, d_out, d_in, seed=j)
        gen[mt] = (A.requires_grad_(True), B.requires_grad_(True))
        for i, (ad, _) in enumerate(teachers):
            ad[mt] = lora((L,), 8, d_out, d_in, seed=100 + 10 * i + j)  # teacher rank 8, generated rank 4
    teachers[2][0]["q"] = (torch.zeros(L, 8, 32), torch.zeros(L, 32, 8))  # a zero teacher update: unnormalised
    got = l_ins_per_task(gen, 1.5, teachers)
    loop = torch.stack([torch.cat([delta_w_distance(A[i], B[i], 1.5, *teachers[i][0][mt], teachers[i][1])
                                   for mt, (A, B) in gen.items()]).float().mean() for i in range(n_tasks)])
    assert got.shape == (n_tasks,) and got.dtype == torch.float32
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=0)
    w = torch.tensor([3.0, 1.0, 2.0, 5.0])  # token weights, as the finetune applies them
    grads = torch.autograd.grad((got * w).sum(), [t for ab in gen.values() for t in ab])
    want = torch.autograd.grad((loop * w).sum(), [t for ab in gen.values() for t in ab])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="4 generated tasks but 3 teachers"):
        l_ins_per_task(gen, 1.5, teachers[:3])
    teachers[1][0]["q"] = lora((L,), 2, 32, 32, seed=0)
    with pytest.raises(ValueError, match="module type 'q': teachers of different shapes"):
        l_ins_per_task(gen, 1.5, teachers)
