"""The student end to end on tiny T5 and tiny LLaMA: exactness at init, batch invariance, gradients, generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagi_ds.errors import TagiError

from tests.tiny import make_student, rand_ids
from tests.tiny import randomize_b_heads

# Three tasks' instructions with different real lengths (right-padded), as a caller would batch them.
INSTR = rand_ids((3, 6), 10)
INSTR_MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def _batch(arch: str):
    """Rows (tasks 1, 0, 2); row 1 is the 'example' (task 0), padded more than it needs to be."""
    x = rand_ids((3, 7), 11)
    if arch == "t5":
        xm = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 5 + [0] * 2])
        labels = rand_ids((3, 4), 12)
        labels[1, 3:] = -100
        return x, xm, labels
    xm = torch.tensor([[1] * 7, [0] * 3 + [1] * 4, [0] * 2 + [1] * 5])  # left-padded
    labels = x.masked_fill(xm == 0, -100)
    labels[:, :4] = -100  # prompt positions
    return x, xm, labels


def _example_alone(arch: str, x, xm, labels):
    """Row 1 of the batch without its padding, and its task's instruction without padding."""
    keep = xm[1].bool()
    xa = x[1][keep][None]
    la = labels[1][labels[1] != -100][None] if arch == "t5" else labels[1][keep][None]
    return xa, torch.ones_like(xa), la


def _real(arch, logits_row, xm_row, labels_row):
    """The logits positions of real tokens (T5: decoder positions with labels; LLaMA: unpadded inputs)."""
    return logits_row[labels_row != -100] if arch == "t5" else logits_row[xm_row.bool()]


def test_fresh_hypernet_without_fusion_is_the_bare_backbone(arch):
    student = make_student(arch, fusion=False)
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    assert enc.prefix is None
    x = rand_ids((3, 5), 3)
    xm = torch.ones_like(x)
    labels = rand_ids((3, 4), 4) if arch == "t5" else x
    with torch.no_grad():
        out = student(enc, torch.tensor([2, 0, 1]), x, xm, labels=labels)
        bare = student.backbone(input_ids=x, attention_mask=xm, labels=labels)
    assert torch.equal(out.logits, bare.logits)  # exact: ΔW = 0 adds exact zeros
    torch.testing.assert_close(out.loss, bare.loss)


def test_same_logits_alone_and_in_a_mixed_batch(arch):
    student = make_student(arch)
    randomize_b_heads(student)
    x, xm, labels = _batch(arch)
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        out = student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels)
        # alone: the task's instruction encoded by itself, without padding
        enc0 = student.encode_instructions(INSTR[:1, :4], INSTR_MASK[:1, :4])
        xa, xma, la = _example_alone(arch, x, xm, labels)
        alone = student(enc0, torch.tensor([0]), xa, xma, labels=la)
    torch.testing.assert_close(enc0.pooled[0], enc.pooled[0], atol=1e-5, rtol=1e-5)
    batch_row = _real(arch, out.logits[1], xm[1], labels[1])
    torch.testing.assert_close(batch_row, alone.logits[0], atol=1e-5, rtol=1e-5)
    # and the example's loss equals its own CE
    torch.testing.assert_close(alone.loss, F.cross_entropy(*(
        (alone.logits[0], la[0]) if arch == "t5" else (alone.logits[0, :-1], la[0, 1:]))), atol=1e-5, rtol=1e-5)


def test_gradients_reach_hypernet_not_backbone(arch):
    student = make_student(arch)
    student.train()
    assert not student.backbone.training  # frozen backbone stays in eval mode (no dropout)
    x, xm, labels = _batch(arch)
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    out = student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels)
    out.loss.backward()
    assert all(p.grad is None for p in student.backbone.parameters())
    hn = student.hypernet
    for i, mt in enumerate(hn.types):
        n_a = hn.r * hn.shapes[mt][1]
        assert hn.head_weight[str(i)].grad[n_a:].abs().sum() > 0, mt  # B rows, at the zero init
        assert hn.head_bias[str(i)].grad[n_a:].abs().sum() > 0, mt
        # At B = 0 exactly, ∂L/∂A = 0 and nothing flows below the heads: the first step moves B only (as in PEFT).
        assert hn.head_weight[str(i)].grad[:n_a].abs().sum() == 0, mt
    assert not enc.pooled.requires_grad  # the frozen instruction encoding carries no graph
    # once B ≠ 0 the whole hypernetwork learns
    hn.zero_grad(set_to_none=True)
    randomize_b_heads(student)
    student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels).loss.backward()
    assert hn.pooler[0].weight.grad.abs().sum() > 0 and hn.trunk[0].weight.grad.abs().sum() > 0
    assert hn.layer_embed.weight.grad.abs().sum() > 0 and hn.type_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.backbone.parameters())


def test_fusion_changes_the_output_and_can_be_disabled(arch):
    student = make_student(arch)
    x, xm, labels = _batch(arch)
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        fused = student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels).logits
        student.fusion = False
        plain = student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels).logits
        bare = (student.backbone(input_ids=x, attention_mask=xm, labels=labels).logits if arch == "t5" else None)
    for row in range(3):
        a, b = _real(arch, fused[row], xm[row], labels[row]), _real(arch, plain[row], xm[row], labels[row])
        assert (a - b).abs().max() > 1e-3
    if bare is not None:
        assert torch.equal(plain, bare)


def _greedy_reference(student, arch, enc, task_ids, x, xm, steps, eos, pad):
    """Greedy decoding by full re-computation (no cache), one token at a time."""
    n = x.shape[0]
    toks = torch.full((n, steps), pad)
    done = torch.zeros(n, dtype=torch.bool)
    gen = torch.empty(n, 0, dtype=torch.long)
    for s in range(steps):
        if arch == "t5":
            dec = torch.cat([torch.zeros(n, 1, dtype=torch.long), gen], dim=1)
            logits = student(enc, task_ids, x, xm, decoder_input_ids=dec).logits
        else:
            logits = student(enc, task_ids, torch.cat([x, gen], 1), torch.cat([xm, torch.ones_like(gen)], 1)).logits
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        toks[:, s] = nxt
        done |= nxt == eos
        gen = torch.cat([gen, nxt[:, None]], 1)
    return toks


def test_generate_matches_greedy_reference_and_is_batch_invariant(arch):
    student = make_student(arch)
    randomize_b_heads(student, std=0.3)
    x = rand_ids((3, 6), 21)
    if arch == "t5":
        xm = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]])
    else:
        xm = torch.tensor([[1] * 6, [0] * 3 + [1] * 3, [0] + [1] * 5])  # left-padded
    task_ids = torch.tensor([2, 0, 1])
    cfg = student.backbone.config
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        toks = student.generate(enc, task_ids, x, xm, max_new_tokens=5)
        ref = _greedy_reference(student, arch, enc, task_ids, x, xm, 5, cfg.eos_token_id, cfg.pad_token_id)
        keep = xm[1].bool()
        alone = student.generate(enc.select([0]), torch.tensor([0]), x[1][keep][None], xm[1][keep][None], 5)
    assert toks.shape == (3, 5) and toks.dtype == torch.long
    assert torch.equal(toks, ref)
    assert torch.equal(alone[0], toks[1])
    assert len({tuple(r) for r in toks.tolist()}) > 1  # the rows' tasks really differ


def test_train_encoder_copy_gets_gradients(arch):
    student = make_student(arch, train_encoder=True)
    randomize_b_heads(student)
    x, xm, labels = _batch(arch)
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    assert enc.pooled.requires_grad
    student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels).loss.backward()
    assert all(p.grad is None for p in student.backbone.parameters())
    grads = [p.grad for p in student.instruction_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert set(student.trainable_state_dict()) >= {k for k in student.state_dict() if k.startswith("hypernet.")}
    assert not any(k.startswith("backbone.") for k in student.trainable_state_dict())


def test_encode_inside_apply_is_refused():
    student = make_student("t5")
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    with student.hooks.apply(student.generate_adapters(enc), torch.tensor([0])):
        with pytest.raises(TagiError, match="plain backbone"):
            student.encode_instructions(INSTR, INSTR_MASK)


def test_gradient_checkpointing_is_refused():
    from tagi_ds.errors import ConfigError
    student = make_student("llama")
    student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x, xm, labels = _batch("llama")
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        student(enc, torch.tensor([1, 0, 2]), x, xm, labels=labels)
