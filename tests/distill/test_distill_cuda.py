"""On a GPU: sparse KL at a real vocabulary size keeps peak memory near the logits (dense KL does not), and the
GPU values match the CPU reference. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.distill.l_ins import delta_w_distance, delta_w_distance_dense
from tagi_ds.distill.sparse_kl import dense_kl, sparse_kl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _peak(fn) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def test_sparse_kl_memory_and_values_on_gpu():
    N, L, V, k, T = 8, 128, 32128, 64, 2.0  # T5 vocabulary
    dev = torch.device("cuda")
    teacher = zipf_logits(0, (N, L), V).to(dev)
    student = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    mask = torch.ones(N, L, dtype=torch.bool, device=dev)
    mask[:, 100:] = False
    lp, ids = torch.topk(torch.log_softmax(teacher / T, -1), k)
    lp16 = lp.half().float()
    logits_bytes = student.numel() * 4

    def run_sparse():
        student.grad = None
        loss = sparse_kl(student, lp16, ids, mask, T, "bucket", chunk_tokens=128)
        loss.backward()
        return loss.detach()

    def run_dense():
        student.grad = None
        loss = dense_kl(student, teacher, mask, T)
        loss.backward()
        return loss.detach()

    s_loss, s_peak = _peak(run_sparse)
    s_grad = student.grad.clone()
    d_loss, d_peak = _peak(run_dense)
    print(f"\nlogits {logits_bytes / 2**20:.0f} MiB; peak extra memory incl. the gradient: sparse "
          f"{s_peak / 2**20:.0f} MiB, dense {d_peak / 2**20:.0f} MiB; KL sparse {s_loss.item():.5f} "
          f"dense {d_loss.item():.5f}")
    assert s_peak < 1.3 * logits_bytes < d_peak  # the gradient buffer + one chunk, vs several full copies
    cpu = sparse_kl(student.detach().cpu(), lp16.cpu(), ids.cpu(), mask.cpu(), T, "bucket")
    torch.testing.assert_close(s_loss.cpu(), cpu, rtol=1e-5, atol=0)
    assert torch.isfinite(s_grad).all()
    assert 0 <= (d_loss - s_loss).item() <= 0.15 * d_loss.item()


def test_l_ins_on_gpu_matches_dense():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    A_t = torch.randn(4, 28, 16, 1024, device=dev, generator=g) / 32  # (tasks, layers, r, d_in)
    B_t = torch.randn(4, 28, 1024, 16, device=dev, generator=g) / 4
    A_g = A_t * (1 + 1e-3 * torch.randn(A_t.shape, device=dev, generator=g))
    B_g = B_t * (1 + 1e-3 * torch.randn(B_t.shape, device=dev, generator=g))
    got = delta_w_distance(A_g, B_g, 2.0, A_t, B_t, 2.0)
    want = delta_w_distance_dense(A_g, B_g, 2.0, A_t, B_t, 2.0)
    assert got.shape == (4, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


def test_priority_cache_kl_on_gpu_memory_values_and_seeded_rows():
    """weighted_kl keeps the sparse KL's flat memory at a real vocabulary size and matches the CPU values; the
    priority rows drawn on the GPU are seeded (the same twice)."""
    from tagi_ds.distill.sampled_kl import priority_weights, weighted_kl
    from tagi_ds.distill.teacher_rows import CacheMode, decode_rows, encode_rows, instance_generator

    N, L, V, T = 8, 128, 32128, 2.0
    dev = torch.device("cuda")
    teacher = zipf_logits(0, (N, L), V).to(dev)
    student = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    mask = torch.ones(N, L, dtype=torch.bool, device=dev)
    mode = CacheMode.make("priority", k=63, seed=0)
    flat = teacher.reshape(N * L, V)
    rows = [decode_rows(encode_rows(flat, mode, T, instance_generator(0, "t", "i", dev))) for _ in range(2)]
    assert all(torch.equal(rows[0][k], rows[1][k]) for k in rows[0])
    lp, ids = (rows[0][k].reshape(N, L, -1).to(dev) for k in ("logprobs", "ids"))
    w = priority_weights(lp, rows[0]["threshold"].reshape(N, L, 1).to(dev))

    def run():
        student.grad = None
        loss = weighted_kl(student, lp, ids, w, mask, T, control="auto", chunk_tokens=128)
        loss.backward()
        return loss.detach()

    loss, peak = _peak(run)
    assert peak < 1.3 * student.numel() * 4
    cpu = weighted_kl(student.detach().cpu(), lp.cpu(), ids.cpu(), w.cpu(), mask.cpu(), T, control="auto")
    torch.testing.assert_close(loss.cpu(), cpu, rtol=1e-4, atol=0)
    assert torch.isfinite(student.grad).all()
