"""distillation_loss weighting (a zero weight removes a term) and teacher_kl from an on-disk cache."""
from __future__ import annotations

import pytest
import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.distill.logit_cache import CacheShardWriter, manifest_fields
from tagi_ds.distill.losses import distillation_loss, teacher_kl
from tagi_ds.distill.signal import CachedTeacherSignal
from tagi_ds.distill.sparse_kl import dense_kl
from tagi_ds.errors import ArtifactMismatchError


def test_zero_weight_removes_the_term_completely():
    ce = torch.tensor(2.0, requires_grad=True)
    kl = torch.tensor(0.5, requires_grad=True)

    def never() -> torch.Tensor:
        raise AssertionError("a zero-weight term must not be computed")

    total, terms = distillation_loss(ce, lambda: kl, never, lambda_kl=0.5, lambda_ins=0.0)
    assert set(terms) == {"ce", "kl"} and total.item() == pytest.approx(2.25)
    total.backward()
    assert kl.grad.item() == pytest.approx(0.5) and ce.grad.item() == 1.0
    total, terms = distillation_loss(ce, never, torch.tensor(3.0), lambda_kl=0.0, lambda_ins=2.0)
    assert set(terms) == {"ce", "l_ins"} and total.item() == pytest.approx(8.0)
    total, terms = distillation_loss(ce, None, None, 0.0, 0.0)
    assert set(terms) == {"ce"} and total is ce
    with pytest.raises(ValueError, match="lambda_kl=1.0 but no kl term"):
        distillation_loss(ce, None, None, 1.0, 0.0)


def test_teacher_kl_from_a_written_cache_matches_dense(tmp_path):
    V, T, task = 64, 2.0, "task007_demo"
    lengths = [5, 3, 4]
    teacher = zipf_logits(0, (3, 5), V)  # (N, L, V)
    fields = manifest_fields(tokenizer_hash="h", backbone_id="tiny", teacher_adapter_hash="a", k=V, temperature=T,
                             prompt_format="tk", max_source_length=32, max_target_length=8, vocab_size=V)
    with CacheShardWriter(tmp_path, task, fields) as w:
        for i, n in enumerate(lengths):
            w.add(f"{task}-{i}", teacher[i, :n])
    signal = CachedTeacherSignal(tmp_path, expect={"k": V, "temperature": T})
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]  # (3, 6): student padded one further
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 6, V, generator=g, requires_grad=True)
    t_pad = torch.cat([teacher, torch.zeros(3, 1, V)], dim=1)
    ids = [f"{task}-{i}" for i in range(3)]
    for mode in ("bucket", "renormalize"):
        got = teacher_kl(student, mask, signal, task, ids, T, missing_mass=mode)
        torch.testing.assert_close(got, dense_kl(student, t_pad, mask, T), rtol=2e-3, atol=0)  # float16 store
    got.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[~mask] == 0).all()
    with pytest.raises(ArtifactMismatchError, match="expects 1.0"):
        teacher_kl(student, mask, CachedTeacherSignal(tmp_path, expect={"temperature": 1.0}), task, ids, T)
    bad = mask.clone()
    bad[0, 0] = False
    with pytest.raises(ValueError, match="left-aligned"):
        teacher_kl(student, bad, signal, task, ids, T)
