"""LLaMA split prefix attention (issue 20): the same numbers and gradients as the expanded-prefix cache + SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagi_ds.modeling.prefix_attention import (install_prefix_attention, prefix_fusion, split_pays,
                                              split_prefix_attention)
from tagi_ds.modeling.tiny import tiny_llama_config

from tests.tiny import make_student, rand_ids, randomize_b_heads, tiny_backbone


def _reference(q, k_x, v_x, k_i, v_i, task_ids, bias, scaling):
    """Per row: [k_i[task] ; k_x] copied per row, GQA heads repeated, one SDPA (the cache path's computation)."""
    rep = q.shape[1] // k_x.shape[1]
    k = torch.cat([k_i.index_select(0, task_ids), k_x], dim=2).repeat_interleave(rep, dim=1)
    v = torch.cat([v_i.index_select(0, task_ids), v_x], dim=2).repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scaling)


@pytest.mark.parametrize("task_ids", [[0, 0, 0, 1, 1, 1, 2, 2, 2],  # contiguous, uniform: one batched matmul
                                      [2, 0, 1, 0, 2, 1, 1, 0, 2],  # interleaved: permuted into groups and back
                                      [1, 1, 0, 0, 0, 0, 0, 2, 1],  # uneven groups: one matmul per task
                                      [2] * 9])  # one task: its group's result comes back as a strided view
def test_split_attention_equals_concatenated_sdpa_values_and_grads(task_ids):
    g = torch.Generator().manual_seed(0)
    N, H, Hkv, T, Li, d = 9, 4, 2, 5, 6, 8
    task_ids = torch.tensor(task_ids)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    q, k_x, v_x = leaf(N, H, T, d), leaf(N, Hkv, T, d), leaf(N, Hkv, T, d)
    k_i, v_i = leaf(3, Hkv, Li, d), leaf(3, Hkv, Li, d)
    instr_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    input_mask = torch.ones(N, T, dtype=torch.long)
    input_mask[1, 3:] = 0  # right padding
    input_mask[4, :2] = 0  # left padding
    fusion = next(iter(prefix_fusion(((k_i, v_i),), instr_mask, input_mask, task_ids).values()))
    got = split_prefix_attention(q, k_x, v_x, k_i, v_i, fusion.groups, fusion.bias, scaling=d ** -0.5)
    want = _reference(q, k_x, v_x, k_i, v_i, task_ids, fusion.bias, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    leaves = (q, k_x, v_x, k_i, v_i)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    g_want = torch.autograd.grad((want * w).sum(), leaves)
    for name, a, b in zip(("q", "k_x", "v_x", "k_i", "v_i"), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


def test_bias_hides_instruction_padding_and_future_own_keys():
    imask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    xmask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    fusion = next(iter(prefix_fusion(((torch.zeros(2, 1, 3, 2),) * 2,), imask, xmask, torch.tensor([0, 1])).values()))
    visible = (fusion.bias[:, 0] == 0).long()  # (N, T, Li + T)
    assert visible[0, 2].tolist() == [1, 1, 0, 1, 1, 1, 0]  # task 0's pad hidden; own keys 0..2
    assert visible[0, 3].tolist() == [1, 1, 0, 1, 1, 1, 0]  # the own pad key is never visible
    assert visible[1, 1].tolist() == [1, 1, 1, 0, 1, 0, 0]  # left pad hidden, future hidden
    assert fusion.groups.tasks == (0, 1)


def _student_pair(seed: int = 0):
    """Two float64 students on copies of one backbone, one per path, same hypernetwork weights."""
    import copy

    split = make_student("llama", tiny_backbone("llama", seed=seed)).double()
    cached = make_student("llama", tiny_backbone("llama", seed=seed)).double()
    cached.split_prefix = False  # the expanded prefix cache + SDPA (the pre-issue-20 path)
    randomize_b_heads(split)
    cached.hypernet.load_state_dict(copy.deepcopy(split.hypernet.state_dict()))
    assert split.split_prefix and split_pays(split.backbone.config, 7)  # the inputs below take the split path
    return split, cached


@pytest.mark.parametrize("task_ids", [[0, 0, 0, 1, 1, 1], [2, 0, 1, 0, 2, 0], [1] * 6])
def test_student_forward_and_hypernet_grads_equal_the_cache_path(task_ids):
    split, cached = _student_pair()
    instr = rand_ids((3, 6), 10)
    imask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]])
    x = rand_ids((6, 7), 11)
    xm = torch.ones_like(x)
    xm[1, 5:] = 0  # right-padded (training batches)
    xm[4, :2] = 0  # left-padded
    labels = x.masked_fill(xm == 0, -100)
    ids = torch.tensor(task_ids)
    outs = []
    for student in (split, cached):
        student.train()
        enc = student.encode_instructions(instr, imask)
        out = student(enc, ids, x, xm, labels=labels)
        out.loss.backward()
        outs.append((out, {k: p.grad for k, p in student.hypernet.named_parameters()}))
    (o_s, g_s), (o_c, g_c) = outs
    real = xm.bool()
    torch.testing.assert_close(o_s.logits[real], o_c.logits[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_s.loss, o_c.loss, rtol=1e-12, atol=1e-12)
    assert g_s.keys() == g_c.keys()
    for k in g_s:
        torch.testing.assert_close(g_s[k], g_c[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"grad {k}: {m}")
    assert any(g.abs().sum() > 0 for g in g_s.values())


def test_split_path_with_activation_checkpointing_gives_the_same_grads():
    split, cached = _student_pair()
    split.enable_activation_checkpointing()
    instr, imask = rand_ids((2, 5), 3), torch.ones(2, 5, dtype=torch.long)
    x = rand_ids((4, 6), 4)
    grads = []
    for student in (split, cached):
        enc = student.encode_instructions(instr, imask)
        student(enc, torch.tensor([0, 0, 1, 1]), x, torch.ones_like(x), labels=x).loss.backward()
        grads.append([p.grad for p in student.hypernet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_without_the_keyword_the_attention_is_hf_own():
    """Installed, the patched attention changes nothing outside the student's forward (instruction pass, generation,
    plain calls)."""
    plain, patched = tiny_backbone("llama"), tiny_backbone("llama")
    install_prefix_attention(patched)
    install_prefix_attention(patched)  # idempotent
    x = rand_ids((2, 5), 7)
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=x, attention_mask=mask).logits,
                                   plain(input_ids=x, attention_mask=mask).logits, rtol=0, atol=0)


def test_long_inputs_keep_the_fused_kernel():
    """The split path materialises (heads x T) scores per key: it is taken while they are no larger than the cache
    path's per-row prefix K/V copy (2 x kv_heads x head_dim per key), e.g. the finetune's ~20-token inputs at
    hidden 512 / 8 heads, not the pretrain's 512-token segments."""
    wide = tiny_llama_config(hidden_size=512, num_heads=8)  # head_dim 64: split up to 128 input tokens
    assert split_pays(wide, 20) and split_pays(wide, 128) and not split_pays(wide, 129)
    gqa = tiny_llama_config(hidden_size=512, num_heads=8, num_kv_heads=2)
    assert split_pays(gqa, 32) and not split_pays(gqa, 33)


def test_a_long_input_takes_the_cache_path_with_the_same_logits():
    split, cached = _student_pair()
    x = rand_ids((2, 12), 5)  # 4 heads x 12 > 2 x 2 kv heads x 8: too long for the split path
    assert not split_pays(split.backbone.config, 12)
    calls = []
    attn = split.backbone.model.layers[0].self_attn
    orig = attn.forward
    attn.forward = lambda *a, **kw: calls.append(kw.get("tagi_instruction_prefix")) or orig(*a, **kw)
    instr, imask = rand_ids((1, 5), 3), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        got = split(split.encode_instructions(instr, imask), torch.tensor([0, 0]), x, torch.ones_like(x)).logits
        want = cached(cached.encode_instructions(instr, imask), torch.tensor([0, 0]), x, torch.ones_like(x)).logits
    assert calls and all(c is None for c in calls)  # HF's own attention over the expanded cache
    torch.testing.assert_close(got, want, rtol=0, atol=0)
