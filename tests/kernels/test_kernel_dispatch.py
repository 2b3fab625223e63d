"""Kernel dispatch (backend choice, errors), the attention-implementation helper, and the references' agreement."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.errors import ConfigError
from tagi_ds.kernels import dispatch, reference


def test_naive_per_token_equals_segmented_reference():
    gen = torch.Generator().manual_seed(0)
    n_tasks, r, d_in, d_out = 3, 5, 12, 10
    x = torch.randn(7, 4, d_in, generator=gen)
    A = torch.randn(n_tasks, r, d_in, generator=gen)
    B = torch.randn(n_tasks, d_out, r, generator=gen)
    tid = torch.tensor([2, 2, 0, 1, 2, 0, 0])  # ragged: 3, 1 and 3 rows
    seg = reference.segmented_lora(x, A, B, tid, 0.25)
    naive = reference.naive_per_token_lora(x, A, B, tid, 0.25)
    torch.testing.assert_close(naive, seg, rtol=1e-5, atol=1e-5)
    # and both equal the dense per-row definition y = s · x Aᵀ Bᵀ
    dense = torch.stack([x[i] @ A[t].T @ B[t].T for i, t in enumerate(tid.tolist())]) * 0.25
    torch.testing.assert_close(seg, dense, rtol=1e-5, atol=1e-5)


def test_reference_hyper_head_layout_is_peft():
    """A's first r·d_in head outputs are (r, d_in) row-major; B's are (d_out, r) row-major."""
    r, d_in, d_out, d_h = 2, 3, 4, 5
    h = torch.randn(2, 3, d_h)
    w = torch.randn(r * d_in + d_out * r, d_h)
    b = torch.randn(r * d_in + d_out * r)
    A, B = dispatch.hyper_head(h, w, b, r, d_in, d_out, backend="reference")
    flat = h[1, 2] @ w.T + b
    torch.testing.assert_close(A[1, 2], flat[: r * d_in].view(r, d_in))
    torch.testing.assert_close(B[1, 2], flat[r * d_in:].view(d_out, r))


def test_auto_uses_reference_on_cpu():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert dispatch.resolve_backend("reference", torch.device("cpu")) == "reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_uses_triton_on_cuda():
    expected = "triton" if dispatch.triton_available() else "reference"
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == expected


def test_auto_head_is_the_reference_and_its_slices_are_views():
    """auto keeps the head on F.linear: A and B are views of one GEMM output, which the LoRA kernel reads strided."""
    r, d_in, d_out = 2, 6, 4
    h = torch.randn(3, 2, 5)
    w, b = torch.randn(r * d_in + d_out * r, 5), torch.randn(r * d_in + d_out * r)
    A, B = dispatch.hyper_head(h, w, b, r, d_in, d_out, backend="auto")
    assert A._base is not None and A._base is B._base  # one buffer, no copies
    torch.testing.assert_close(A, reference.hyper_head(h, w, b, r, d_in, d_out)[0])


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 3, 4)
    A, B = torch.randn(1, 2, 4), torch.randn(1, 4, 2)
    with pytest.raises(ConfigError, match=r"hypernet.kernel=triton needs CUDA.*TRITON_INTERPRET=1"):
        dispatch.segmented_lora(x, A, B, torch.zeros(2, dtype=torch.long), 1.0, backend="triton")


def test_unknown_backend_is_rejected():
    with pytest.raises(ConfigError, match="unknown kernel backend 'cutlass'"):
        dispatch.resolve_backend("cutlass", torch.device("cpu"))


def test_shape_errors_name_the_shapes():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        dispatch.segmented_lora(x, torch.randn(1, 2, 5), torch.randn(1, 4, 2), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="hyper_head: expected"):
        dispatch.hyper_head(torch.randn(1, 2, 3), torch.randn(7, 3), None, 1, 2, 2)


def test_choose_attn_implementation():
    assert dispatch.choose_attn_implementation("t5", "cuda") is None
    assert dispatch.choose_attn_implementation("T5", torch.device("cpu")) is None
    assert dispatch.choose_attn_implementation("llama", "cpu") == "sdpa"  # flash-attn is CUDA-only
    on_cuda = dispatch.choose_attn_implementation("llama", "cuda")
    assert on_cuda == ("flash_attention_2" if dispatch._flash_attn_available() else "sdpa")
    with pytest.raises(ConfigError, match="arch=auto"):
        dispatch.choose_attn_implementation("auto", "cpu")
