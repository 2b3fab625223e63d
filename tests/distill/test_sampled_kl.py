"""Sampled / priority KL: unbiased value and gradient over many cache draws (z-score bounds), the hand-written
backward against autograd, the control-variate coefficient, padding and chunking."""
from __future__ import annotations

import functools

import pytest
import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.distill.losses import signal_kl
from tagi_ds.distill.sampled_kl import control_coefficients, token_terms, weighted_kl
from tagi_ds.distill.signal import PriorityTeacher, SampledTeacher, TopKTeacher, stack_rows
from tagi_ds.distill.sparse_kl import dense_kl
from tagi_ds.distill.teacher_rows import CacheMode, decode_rows, encode_rows, instance_generator

T = 2.0
V = 120


def setup(seed: int = 0, N: int = 3, L: int = 4, noise: float = 1.0):
    t = zipf_logits(seed, (N, L), V, a=1.2)  # (N, L, V): a flat teacher at T = 2, top-8 holds well under 90%
    g = torch.Generator().manual_seed(seed + 7)
    s = t + noise * torch.randn(N, L, V, generator=g)
    lengths = [L, L - 1, 2][:N]
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return s.double(), t, mask, lengths


def draw(mode: CacheMode, t: torch.Tensor, lengths, d: int):
    """One cache of the batch's label positions (draw d), as the reader would hand it over."""
    flat = torch.cat([t[i, :n] for i, n in enumerate(lengths)])  # (M, V)
    rows = decode_rows(encode_rows(flat, mode, T, instance_generator(mode.seed or 0, "task", str(d))))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return stack_rows(mode, [{k: v[a:a + n] for k, v in rows.items()} for a, n in zip(starts, lengths)], lengths)


DRAWS = 200
CASES = [  # (mode, estimator, control); each its own seed: independent checks
    (CacheMode.make("sampled", num_samples=8, seed=0), "counts", 0.0),
    (CacheMode.make("sampled", num_samples=8, seed=1), "distinct", 0.0),
    (CacheMode.make("sampled", num_samples=8, seed=2), "distinct", "auto"),
    (CacheMode.make("priority", k=8, seed=3), None, 0.0),
    (CacheMode.make("priority", k=8, seed=4), None, 1.0),
    (CacheMode.make("priority", k=8, seed=5), None, "auto"),
]


@functools.lru_cache(maxsize=None)
def many_draws(mode, estimator, control, draws: int):
    s, t, mask, lengths = setup()
    values, grads = [], []
    for d in range(draws):
        tb = draw(mode, t, lengths, d)
        leaf = s.clone().requires_grad_(True)
        loss = signal_kl(leaf, mask, tb, T, estimator=estimator or "distinct", control=control)
        (g,) = torch.autograd.grad(loss, leaf)
        values.append(loss.detach())
        grads.append(g[mask])
    leaf = s.clone().requires_grad_(True)
    dense = dense_kl(leaf, t.double(), mask, T)
    (g_dense,) = torch.autograd.grad(dense, leaf)
    return torch.stack(values), torch.stack(grads), dense.detach(), g_dense[mask]


@pytest.mark.parametrize("mode,estimator,control", CASES, ids=lambda x: str(x) if not isinstance(x, CacheMode)
                         else f"{x.name}{x.width}")
def test_mean_over_draws_is_the_dense_kl_and_its_gradient(mode, estimator, control):
    """Unbiased: over 200 independent caches the mean loss is within 4 standard errors of the dense KL, and the
    mean gradient's squared distance to autograd's dense gradient is of the size of its variance (a bias would
    add its square: the top-k cache fails the same checks below)."""
    values, grads, dense, g_dense = many_draws(mode, estimator, control, DRAWS)
    se = values.std() / values.numel() ** 0.5
    z = float((values.mean() - dense) / se)
    print(f"\n{mode.name} {estimator} c={control}: mean {values.mean():.5f} dense {dense:.5f} z {z:+.2f}")
    assert abs(z) < 4.0
    g_se2 = grads.var(0) / grads.shape[0]  # (M, V) squared standard error of each mean coordinate
    ratio = float(((grads.mean(0) - g_dense) ** 2).sum() / g_se2.sum())
    assert ratio < 2.0, ratio  # E[ratio] = 1 when unbiased


def test_the_same_checks_reject_the_biased_top_k_cache():
    s, t, mask, lengths = setup()
    values, grads, _, _ = many_draws(CacheMode.make("priority", k=8, seed=5), None, "auto", DRAWS)
    se = float(values.std() / values.numel() ** 0.5)
    leaf = s.clone().requires_grad_(True)
    lp, ids = torch.topk(torch.log_softmax(t / T, -1), 8)
    topk = signal_kl(leaf, mask, TopKTeacher(lp.half().float(), ids, mask), T, missing_mass="bucket").detach()
    (g_topk,) = torch.autograd.grad(signal_kl(leaf, mask, TopKTeacher(lp.half().float(), ids, mask), T), leaf)
    leaf2 = s.clone().requires_grad_(True)
    dense = dense_kl(leaf2, t.double(), mask, T)
    (g_dense,) = torch.autograd.grad(dense, leaf2)
    dense = dense.detach()
    assert abs(float(topk - dense)) / se > 10  # the bucket KL's bias, in the sampled estimate's standard errors
    g_se2 = float((grads.var(0) / grads.shape[0]).sum())
    assert float(((g_topk - g_dense)[mask] ** 2).sum()) / g_se2 > 5  # the unbiased ones stay below 2


@pytest.mark.parametrize("control", [0.0, 1.0, 0.4, "auto"])
def test_hand_written_backward_matches_autograd(control):
    s, t, mask, lengths = setup(seed=3, noise=2.0)
    for mode in (CacheMode.make("sampled", num_samples=10, seed=1), CacheMode.make("priority", k=6, seed=1)):
        tb = draw(mode, t, lengths, 0)
        w = tb.weights("distinct") if isinstance(tb, SampledTeacher) else tb.weights()
        leaf = s.clone().requires_grad_(True)
        got = weighted_kl(leaf, tb.logprobs, tb.ids, w, mask, T, control=control, chunk_tokens=2)
        (g_got,) = torch.autograd.grad(got, leaf)
        ref_leaf = s.clone().requires_grad_(True)
        x, y = token_terms(ref_leaf[mask], tb.logprobs[mask].double(), tb.ids[mask], w[mask].double(), T)
        ref = (x + control_coefficients(x, y, control) * y).mean() * T * T  # the coefficient is a constant
        (g_ref,) = torch.autograd.grad(ref, ref_leaf)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
        assert (g_got[~mask] == 0).all()


def test_chunking_padding_and_zero_probability_ids_change_nothing():
    s, t, mask, lengths = setup(seed=5)
    t[0, 0, :5] = -1e4  # five ids the teacher never picks: log p = -inf after float16 storage
    tb = draw(CacheMode.make("priority", k=V, seed=2), t, lengths, 0)  # k = V: every id kept, even p = 0 ones
    w = tb.weights()
    one = weighted_kl(s, tb.logprobs, tb.ids, w, mask, T, control=1.0, chunk_tokens=1)
    many = weighted_kl(s, tb.logprobs, tb.ids, w, mask, T, control=1.0, chunk_tokens=1000)
    torch.testing.assert_close(one, many)
    assert torch.isfinite(one)
    # k = V covers the vocabulary: weights are p exactly, the estimate is the dense KL up to float16 storage
    torch.testing.assert_close(weighted_kl(s, tb.logprobs, tb.ids, w, mask, T, control=0.0),
                               dense_kl(s, t.double(), mask, T), rtol=2e-3, atol=0)
    lp2, ids2, w2 = tb.logprobs.clone(), tb.ids.clone(), w.clone()
    lp2[~mask], ids2[~mask], w2[~mask] = float("nan"), 3, 1.0  # garbage at padded positions
    leaf = s.clone().requires_grad_(True)
    again = weighted_kl(leaf, lp2, ids2, w2, mask, T, control=1.0)
    torch.testing.assert_close(again, one)
    (g,) = torch.autograd.grad(again, leaf)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()


def test_auto_coefficient_ignores_the_tokens_own_draws_and_tracks_the_student():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    c = control_coefficients(x, y, "auto")
    x2, y2 = x.clone(), y.clone()
    x2[7], y2[7] = 100.0, -3.0  # token 7's own draws change: its coefficient must not
    assert control_coefficients(x2, y2, "auto")[7] == c[7]
    # a student close to the teacher: X ~ -Y (log r ~ r - 1) -> coefficient ~ 1; unrelated X -> ~ 0
    near = control_coefficients(-y + 0.01 * x, y, "auto")
    assert (near - 1).abs().max() < 0.05
    assert control_coefficients(x, y, "auto").abs().mean() < 0.3
    assert (control_coefficients(x[:2], y[:2], "auto") == 0).all()  # fewer than 3 tokens: off
    assert (control_coefficients(x, y, 0.5) == 0.5).all()


def test_dispatch_by_teacher_kind_and_checks():
    s, t, mask, lengths = setup()
    with pytest.raises(ValueError, match="estimator must be 'counts' or 'distinct'"):
        signal_kl(s, mask, draw(CacheMode.make("sampled", num_samples=4, seed=0), t, lengths, 0), T, estimator="x")
    pt = draw(CacheMode.make("priority", k=4, seed=0), t, lengths, 0)
    assert isinstance(pt, PriorityTeacher)
    bad = mask.clone()
    bad[0, 0] = False
    from tagi_ds.errors import ArtifactMismatchError
    with pytest.raises(ArtifactMismatchError, match="label positions disagree"):
        signal_kl(s, bad, pt, T)
    with pytest.raises(ValueError, match="shapes disagree"):
        weighted_kl(s, pt.logprobs, pt.ids, pt.weights()[..., :2], mask, T)
