"""Instruction fusion: T5 state concat; LLaMA KV prefix equals running [instruction ; input] as one sequence."""
from __future__ import annotations

import torch

from tagi_ds.modeling.hf_compat import cache_kwargs
from tagi_ds.modeling.fusion import (expand_prefix, fuse_encoder_states, llama_instruction_pass,
                                     positions_from_mask, prefix_mask_and_positions)

from tests.tiny import rand_ids, tiny_backbone


def test_fuse_encoder_states():
    instr = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    imask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inp = -torch.ones(3, 2, 2)
    xmask = torch.tensor([[1, 1], [1, 0], [0, 1]])
    states, mask = fuse_encoder_states(instr, imask, inp, xmask, torch.tensor([1, 0, 1]))
    assert states.shape == (3, 5, 2)
    assert torch.equal(states[1, :3], instr[0]) and torch.equal(states[0, :3], instr[1])
    assert torch.equal(states[:, 3:], inp)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 1, 1, 0, 1]]


def test_positions_continue_after_real_instruction_length():
    imask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    xmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])  # left- and right-padded rows
    mask, pos = prefix_mask_and_positions(imask, xmask, torch.tensor([0, 1, 0]))
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1, 1, 0]]
    assert pos[0, 2:].tolist() == [3, 4] and pos[1].tolist() == [5, 6, 7, 8] and pos[2, :3].tolist() == [3, 4, 5]
    assert positions_from_mask(torch.tensor([[0, 1, 1]])).tolist() == [[0, 0, 1]]


def test_llama_prefix_equals_one_long_sequence():
    model = tiny_backbone("llama")
    instr = rand_ids((2, 7), 1)
    imask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])  # task 0's instruction is right-padded
    x = rand_ids((3, 4), 2)
    xmask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])  # left-padded inputs
    task_ids = torch.tensor([0, 1, 0])
    with torch.no_grad():
        hidden, prefix = llama_instruction_pass(model, instr, imask)
        assert hidden.shape == (2, 7, 32) and len(prefix) == 2 and prefix[0][0].shape == (2, 2, 7, 8)  # GQA kv=2
        mask, pos = prefix_mask_and_positions(imask, xmask, task_ids)
        cache = expand_prefix(prefix, task_ids, model.config)
        logits = model(input_ids=x, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache)).logits
        k_before = prefix[0][0].clone()
        for row, t in enumerate(task_ids.tolist()):
            seq = torch.cat([instr[t][imask[t].bool()], x[row][xmask[row].bool()]])[None]  # no padding at all
            ref = model(input_ids=seq).logits[0, -int(xmask[row].sum()):]
            torch.testing.assert_close(logits[row][xmask[row].bool()], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(prefix[0][0], k_before)  # the per-task prefix is never modified by cache updates


def _cache_bytes(cache) -> int:
    """Bytes of the tensors a cache object keeps alive after the forward (per-row copies and grown states)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def test_the_training_forward_keeps_the_prefix_per_task_not_per_row():
    """A teacher-forced forward through `lazy_prefix_cache` gives the per-row cache's logits exactly, and keeps only
    the per-task prefix: the per-row cache kept N rows x every layer, grown by the input (about N/n_tasks x more)."""
    from tagi_ds.modeling.fusion import lazy_prefix_cache

    model = tiny_backbone("llama")
    instr, imask = rand_ids((2, 12), 1), torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
    x = rand_ids((8, 5), 2)
    xmask = torch.ones_like(x)
    task_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        _, prefix = llama_instruction_pass(model, instr, imask)
        mask, pos = prefix_mask_and_positions(imask, xmask, task_ids)
        per_row, lazy = expand_prefix(prefix, task_ids, model.config), lazy_prefix_cache(prefix, task_ids, model.config)
        want = model(input_ids=x, attention_mask=mask, position_ids=pos, **cache_kwargs(model, per_row)).logits
        got = model(input_ids=x, attention_mask=mask, position_ids=pos, **cache_kwargs(model, lazy)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    per_task = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in prefix)
    assert _cache_bytes(lazy) == per_task
    assert _cache_bytes(per_row) >= 4 * per_task  # 8 rows of 2 tasks, plus the input grown in
