"""teacher_rows.encode_rows: what each cache mode stores, seeded draws, and the modes' parameter checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.distill.teacher_rows import (CacheMode, decode_rows, encode_instance, encode_rows, instance_generator,
                                         instance_seed)

V, T = 300, 2.0


def test_topk_rows_are_torch_topk_in_float16():
    logits = zipf_logits(0, (5,), V)
    rows = encode_rows(logits, CacheMode.make("topk", k=16), T)
    lp, ids = torch.topk(torch.log_softmax(logits / T, -1), 16)
    assert set(rows) == {"logprobs", "ids"} and rows["logprobs"].dtype == np.float16 and rows["ids"].dtype == np.uint16
    assert np.array_equal(rows["ids"], ids.numpy()) and np.array_equal(rows["logprobs"], lp.half().numpy())


def test_sampled_rows_hold_distinct_ids_their_counts_and_log_probs():
    logits = zipf_logits(1, (40,), V, a=1.5)
    mode = CacheMode.make("sampled", num_samples=24, seed=3)
    rows = decode_rows(encode_rows(logits, mode, T, instance_generator(3, "t", "i0")))
    lp_full = torch.log_softmax(logits / T, -1)
    counts, ids = rows["counts"], rows["ids"]
    assert counts.shape == ids.shape == (40, 24)
    assert (counts.sum(1) == 24).all()
    assert (counts[:, :-1] >= counts[:, 1:]).all()  # most drawn first, padding (0) last
    for row in range(40):
        used = counts[row] > 0
        assert len(set(ids[row, used].tolist())) == int(used.sum())  # distinct
        assert (ids[row, ~used] == 0).all() and (rows["logprobs"][row, ~used] == 0).all()
        torch.testing.assert_close(rows["logprobs"][row, used], lp_full[row, ids[row, used]].half().float())


def test_sampled_draws_follow_the_teacher():
    """Pooled over many positions of one teacher row, the draw frequencies match p (chi-square, 3 bins)."""
    logits = zipf_logits(2, (1,), V, a=1.2).expand(400, V)
    p = torch.softmax(logits[0] / T, -1)
    rows = decode_rows(encode_rows(logits, CacheMode.make("sampled", num_samples=50, seed=0), T,
                                   instance_generator(0, "t", "x")))
    freq = torch.zeros(V).index_add_(0, rows["ids"].flatten(), rows["counts"].flatten().float())
    order = p.argsort(descending=True)
    bins = [order[:3], order[3:30], order[30:]]  # head, body, tail
    n = 400 * 50
    chi2 = sum(float((freq[b].sum() - n * p[b].sum()) ** 2 / (n * p[b].sum())) for b in bins)
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_priority_keeps_every_id_above_tau_and_covers_the_vocabulary_at_k_eq_v():
    logits = zipf_logits(3, (30,), V, a=1.0)
    mode = CacheMode.make("priority", k=20, seed=1)
    rows = decode_rows(encode_rows(logits, mode, T, instance_generator(1, "t", "i")))
    lp_full = torch.log_softmax(logits / T, -1)
    assert rows["threshold"].shape == (30, 1) and rows["ids"].shape == (30, 20)
    for row in range(30):
        above = (lp_full[row] > rows["threshold"][row, 0]).nonzero().squeeze(-1).tolist()
        assert set(above) <= set(rows["ids"][row].tolist())  # p > tau means key = p / u > tau: always kept
        assert len(set(rows["ids"][row].tolist())) == 20
    full = decode_rows(encode_rows(logits, CacheMode.make("priority", k=V, seed=1), T,
                                   instance_generator(1, "t", "i")))
    assert torch.isinf(full["threshold"]).all() and (full["threshold"] < 0).all()


def test_draws_are_seeded_per_seed_task_and_instance():
    logits = zipf_logits(4, (6,), V)
    for mode in (CacheMode.make("sampled", num_samples=12, seed=5), CacheMode.make("priority", k=12, seed=5)):
        def draw(seed, task, iid):
            return encode_rows(logits, mode, T, instance_generator(seed, task, iid))["ids"]

        assert np.array_equal(draw(5, "a", "1"), draw(5, "a", "1"))
        assert np.array_equal(draw(5, "a", "1"), encode_instance(logits, mode, T, "a", "1")["ids"])
        assert not np.array_equal(draw(5, "a", "1"), draw(5, "a", "2"))
        assert not np.array_equal(draw(5, "a", "1"), draw(5, "b", "1"))
        assert not np.array_equal(draw(5, "a", "1"), draw(6, "a", "1"))
    assert instance_seed(0, "task", "7") == instance_seed(0, "task", "7") < 2 ** 63
    with pytest.raises(ValueError, match="seeded generator is required"):
        encode_rows(logits, CacheMode.make("priority", k=4, seed=0), T)


def test_mode_parameters_are_checked():
    with pytest.raises(ValueError, match="num_samples .draws per position., not k"):
        CacheMode.make("sampled", k=4, seed=0)
    with pytest.raises(ValueError, match="'topk' takes k, not num_samples"):
        CacheMode.make("topk", num_samples=4)
    with pytest.raises(ValueError, match="give it a seed"):
        CacheMode.make("priority", k=4)
    with pytest.raises(ValueError, match=r"k=400 must be in \[1, vocab_size=300\]"):
        CacheMode.make("priority", k=400, seed=0, vocab_size=V)
    with pytest.raises(ValueError, match="expected one of"):
        CacheMode.make("dense", k=4)
    assert CacheMode.make("sampled", num_samples=300, seed=0).layout(V)["counts"] == (np.dtype(np.uint16), 300)
    assert CacheMode.make("priority", k=8, seed=2).fields() == {"mode": "priority", "k": 8, "sample_seed": 2}
    cfg = dict(top_k=64, num_samples=32, seed=9, vocab_size=50)
    assert CacheMode.of_config("topk", **cfg) == CacheMode("topk", 50, None)  # k capped at V, no seed
    assert CacheMode.of_config("priority", **cfg) == CacheMode("priority", 50, 9)
    assert CacheMode.of_config("sampled", **cfg) == CacheMode("sampled", 32, 9)
