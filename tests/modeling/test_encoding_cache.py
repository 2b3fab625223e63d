"""Instruction encodings kept across steps (EncodingCache): the same encoding as a fresh forward, skipped forwards,
a byte bound, and no caching where the encoding can change."""
from __future__ import annotations

import torch

from tagi_ds.modeling.encoding_cache import EncodingCache

from tests.tiny import make_student, rand_ids, randomize_b_heads

INSTR = rand_ids((4, 9), 20)
LENGTHS = [9, 5, 7, 3]


def _batch(rows: list[int], width: int):
    """The instructions `rows`, right-padded to `width` (>= their longest) with pad id 0."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :LENGTHS[r]] = INSTR[r, :LENGTHS[r]]
        mask[i, :LENGTHS[r]] = 1
    return ids, mask


def _count_backbone_forwards(student) -> list:
    calls = []
    student.backbone.get_decoder().register_forward_hook(lambda *a: calls.append(1)) if student.arch == "llama" \
        else student.backbone.encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_a_held_batch_skips_the_forward_and_equals_a_fresh_encoding(arch):
    student = make_student(arch)
    cache = EncodingCache(1 << 30)
    calls = _count_backbone_forwards(student)
    cache.encode(student, *_batch([0, 1], 12))
    cache.encode(student, *_batch([2, 3], 12))
    assert len(calls) == 2 and cache.stats == {"hits": 0, "misses": 2}
    ids, mask = _batch([3, 0, 2], 16)  # other tasks together, another order, another width
    got = cache.encode(student, ids, mask)
    assert len(calls) == 2 and cache.stats["hits"] == 1  # no backbone forward
    want = student.encode_instructions(ids, mask)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(got.hidden[real], want.hidden[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.mask, mask) and got.hidden.shape == want.hidden.shape
    assert (got.prefix is None) == (want.prefix is None) == (arch == "t5")
    for (kg, vg), (kw, vw) in zip(got.prefix or (), want.prefix or ()):
        assert kg.shape == kw.shape
        torch.testing.assert_close(kg.transpose(1, 2)[real], kw.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vg.transpose(1, 2)[real], vw.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)


def test_the_student_gives_the_same_logits_from_a_held_encoding(arch):
    student = make_student(arch)
    randomize_b_heads(student)
    cache = EncodingCache(1 << 30)
    cache.encode(student, *_batch([1, 2], 8))
    ids, mask = _batch([2, 1], 8)
    x = rand_ids((4, 5), 21)
    labels = rand_ids((4, 3), 22) if arch == "t5" else x
    task_ids = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        held = student(cache.encode(student, ids, mask), task_ids, x, torch.ones_like(x), labels=labels)
        fresh = student(student.encode_instructions(ids, mask), task_ids, x, torch.ones_like(x), labels=labels)
    assert cache.stats["hits"] == 1
    torch.testing.assert_close(held.logits, fresh.logits, rtol=1e-5, atol=1e-5)


def test_the_byte_bound_evicts_the_least_recently_used():
    student = make_student("llama")
    probe = EncodingCache(1 << 30)
    probe.encode(student, *_batch([1], 8))
    one = probe._bytes  # task 1's entry (5 tokens)
    cache = EncodingCache(2 * one + one // 2)  # room for two 5-token entries, never three
    for rows in ([1], [1], [3]):
        cache.encode(student, *_batch(rows, 8))
    assert cache.stats == {"hits": 1, "misses": 2} and len(cache._entries) == 2
    cache.encode(student, *_batch([2], 8))  # 7 tokens: the oldest entries go until it fits
    assert cache._bytes <= cache.max_bytes and len(cache._entries) < 3
    big = EncodingCache(one // 2)  # smaller than any entry: nothing is kept, every call encodes
    big.encode(student, *_batch([1], 8))
    big.encode(student, *_batch([1], 8))
    assert big.stats == {"hits": 0, "misses": 2} and not big._entries


def test_nothing_is_cached_while_the_encoder_trains_or_when_disabled():
    for student, cache in ((make_student("llama", train_encoder=True), EncodingCache(1 << 30)),
                           (make_student("llama"), EncodingCache(0))):
        calls = _count_backbone_forwards(student)
        for _ in range(2):
            cache.encode(student, *_batch([0], 9))
        assert not cache._entries and cache.stats == {"hits": 0, "misses": 0} and len(calls) >= 2
