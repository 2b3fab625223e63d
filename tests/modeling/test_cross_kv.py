"""T5 fusion with the instruction's cross-attention K/V computed once per task equals the concatenation path it
replaces (HF's T5 over [instruction states ; input states] per row): logits, loss and gradients in teacher forcing,
tokens in greedy generation; with and without LoRA on the cross-attention k/v; padded instructions and inputs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tagi_ds.errors import TagiError
from tagi_ds.kernels.grouped_lora import TaskGroups
from tagi_ds.modeling.fusion import _per_entry_matmul
from tagi_ds.modeling.lora import merge_into_copy

from tests.tiny import ALL_KINDS, make_student, rand_ids, randomize_b_heads, tiny_backbone

INSTR = rand_ids((3, 6), 10)
INSTR_MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
X = rand_ids((5, 7), 11)
X_MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5, [1] * 6 + [0]])
LABELS = rand_ids((5, 4), 12)
LABELS[1, 3:] = -100
# interleaved rows, unequal groups (task 1 twice), and one task per batch (uniform, in order)
TASK_ROWS = [torch.tensor([1, 0, 2, 1, 0]), torch.tensor([2, 2, 2, 2, 2]), torch.tensor([0, 1, 0, 1, 2])]
# LoRA on every module (cross k/v included: the instruction K/V carry the task's adapter) / none on cross k, v
KINDS = {"lora_on_cross_kv": ALL_KINDS, "no_lora_on_cross_kv": ["q", "o", "ffn_in", "ffn_out"]}


def _student(kinds, **kw):
    student = make_student("t5", kinds=kinds, **kw)
    randomize_b_heads(student, std=0.3)
    return student


def _both(student, fn):
    """fn() on the cached path, then on the concatenation path of the same student and backbone."""
    assert student.cache_cross_kv
    cached = fn()
    student.cache_cross_kv = False
    try:
        concat = fn()
    finally:
        student.cache_cross_kv = True
    return cached, concat


@pytest.mark.parametrize("kinds", list(KINDS))
@pytest.mark.parametrize("rows", range(len(TASK_ROWS)))
def test_teacher_forcing_logits_and_loss_equal(kinds, rows):
    student = _student(KINDS[kinds])
    task_ids = TASK_ROWS[rows]
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        (lc, sc), (lp, sp) = _both(student, lambda: (lambda o: (o.logits, o.loss))(
            student(enc, task_ids, X, X_MASK, labels=LABELS)))
    torch.testing.assert_close(lc, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, sp, atol=1e-6, rtol=1e-6)
    assert not torch.equal(lc[0], lc[1])


def _grads(student, module, task_ids):
    def run():
        student.zero_grad(set_to_none=True)
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        student(enc, task_ids, X, X_MASK, labels=LABELS).loss.backward()
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    return _both(student, run)


@pytest.mark.parametrize("kinds", list(KINDS))
def test_training_gradients_equal(kinds):
    """In float64, so that what is compared is the maths, not the order fp32 sums the rows' K/V gradients in (the
    cached path sums them into the task's K/V before the projection's backward; fp32 agrees to ~3e-5 relative)."""
    student = _student(KINDS[kinds]).double()
    cached, concat = _grads(student, student.hypernet, TASK_ROWS[0])
    assert cached.keys() == concat.keys() and len(cached) == len(list(student.hypernet.parameters()))
    for name in cached:
        torch.testing.assert_close(cached[name], concat[name], atol=1e-9, rtol=1e-6, msg=name)


@pytest.mark.parametrize("kinds", list(KINDS))
def test_greedy_generation_equal(kinds):
    student = _student(KINDS[kinds])
    student.backbone.config.eos_token_id = None  # no early stop: every step is compared
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        for task_ids in TASK_ROWS:
            cached, concat = _both(student, lambda: student.generate(enc, task_ids, X, X_MASK, max_new_tokens=6))
            assert torch.equal(cached, concat)
        assert len({tuple(r) for r in cached.tolist()}) > 1


def test_generation_step_logits_equal():
    """Logits of every decode step (the cached input K/V and the per-task instruction K/V over 4 steps)."""
    student = _student(ALL_KINDS)
    task_ids = TASK_ROWS[0]
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        toks = student.generate(enc, task_ids, X, X_MASK, max_new_tokens=4)
        dec = torch.cat([torch.zeros(5, 1, dtype=torch.long), toks[:, :3]], 1)
        cached, concat = _both(student, lambda: student(enc, task_ids, X, X_MASK, decoder_input_ids=dec).logits)
    torch.testing.assert_close(cached, concat, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.argmax(-1), toks)  # the step logits are the ones generation followed


def test_trained_instruction_encoder_gets_the_same_gradients():
    student = _student(ALL_KINDS, train_encoder=True).double()
    cached, concat = _grads(student, student.instruction_encoder, TASK_ROWS[0])
    assert cached and cached.keys() == concat.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], concat[name], atol=1e-9, rtol=1e-6, msg=name)


def test_activation_checkpointing_keeps_the_cached_path():
    """The instruction K/V travel as a keyword of the backbone call: the blocks' recompute in backward sees them."""
    student = _student(ALL_KINDS)

    def run():
        student.zero_grad(set_to_none=True)
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        out = student(enc, TASK_ROWS[0], X, X_MASK, labels=LABELS)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in student.hypernet.parameters() if p.grad is not None]

    loss, grads = run()
    student.enable_activation_checkpointing()
    loss_ckpt, grads_ckpt = run()
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_instruction_kv_given_once_for_all_batches():
    """Computed once for all tasks, then reused by batches holding subsets of them; a missing task is refused."""
    student = _student(ALL_KINDS)
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        adapters = student.generate_adapters(enc)
        kv = student.instruction_kv(enc, adapters)
        assert len(kv.keys) == 2 and kv.keys[0].shape == (3, 4, 6, 8)  # (tasks, heads, Li, d_kv)
        for task_ids in TASK_ROWS:
            given = student(enc, task_ids, X, X_MASK, labels=LABELS, adapters=adapters, instruction_kv=kv).logits
            own = student(enc, task_ids, X, X_MASK, labels=LABELS, adapters=adapters).logits
            assert torch.equal(given, own)
        part = student.instruction_kv(enc, adapters, tasks=[2])
        torch.testing.assert_close(part.keys[1][0], kv.keys[1][2])
        with pytest.raises(TagiError, match=r"also has tasks \[0, 1\]"):
            student(enc, TASK_ROWS[0], X, X_MASK, labels=LABELS, adapters=adapters, instruction_kv=part)


def test_instruction_kv_carry_their_task_lora():
    """With LoRA on the cross-attention v, task t's instruction values are W_v h + s·B_t A_t h, per task."""
    student = _student(["v"])
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        adapters = student.generate_adapters(enc)
        kv = student.instruction_kv(enc, adapters)
        attn = student.backbone.decoder.block[1].layer[1].EncDecAttention
        A, B = adapters["dec_cross.v"]
        for t in range(3):
            h = enc.hidden[t]  # (Li, d)
            want = attn.v(h) + student.lora_scale * (h @ A[t, 1].T) @ B[t, 1].T  # hooks off: the plain linear
            torch.testing.assert_close(kv.values[1][t].transpose(0, 1).reshape(6, -1), want, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(kv.values[1][0], student.instruction_kv(enc, {k: (a, torch.zeros_like(b)) for k, (
            a, b) in adapters.items()}).values[1][0])


def test_per_entry_matmul_equals_the_per_row_gather():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 5, 4, generator=g)  # (entries, H, a, b)
    for slots in ([2, 0, 2, 1, 0, 2], [0, 0, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1], [0, 1, 2, 0, 1, 2]):
        slots = torch.tensor(slots)
        x = torch.randn(6, 2, 3, 5, generator=g)  # (N, H, T, a)
        got = _per_entry_matmul(x, w, TaskGroups.of(slots))
        torch.testing.assert_close(got, x @ w.index_select(0, slots), atol=1e-6, rtol=1e-6)


def test_instruction_kv_projected_once_per_task_not_per_row():
    """FLOPs of the cross-attention k/v projections over the instruction: one task with 1 row or 8 rows."""
    student = make_student("t5", kinds=["q"])
    student.backbone.set_attn_implementation("eager")  # CPU SDPA kernels have no FlopCounterMode formula
    d, inner, n_layers = 32, 32, 2
    li = int(INSTR_MASK[1].numel())

    def kv_flops(rows: int, cached: bool) -> int:
        student.cache_cross_kv = cached
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        x, xm = rand_ids((rows, 5), 3), torch.ones(rows, 5, dtype=torch.long)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            student.generate(enc, torch.ones(rows, dtype=torch.long), x, xm, max_new_tokens=1)
        return fc.get_total_flops()

    per_row_instr_kv = n_layers * 2 * (2 * li * d * inner)  # k and v of Li states in each decoder layer
    assert kv_flops(8, True) - kv_flops(1, True) < kv_flops(8, False) - kv_flops(1, False)
    assert (kv_flops(8, False) - kv_flops(1, False)) - (kv_flops(8, True) - kv_flops(1, True)) == 7 * per_row_instr_kv


def test_merged_copy_keeps_its_own_cached_path():
    """merge_into_copy deep-copies the backbone: the copy's cross-attentions use the copy's (merged) weights."""
    student = _student(ALL_KINDS)
    with torch.no_grad():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        adapters = student.generate_adapters(enc)
        merged = merge_into_copy(student.backbone, student.specs, adapters, 0, student.lora_scale)
    attn = merged.decoder.block[0].layer[1].EncDecAttention
    assert attn.forward.attn is attn
    assert student.backbone.decoder.block[0].layer[1].EncDecAttention.forward.attn is not attn


def test_plain_backbone_calls_are_unchanged():
    """Without the keyword the installed cross-attention is HF's own (teachers / baselines share backbones)."""
    plain = tiny_backbone("t5")
    student = make_student("t5")
    x, xm, labels = X[:2], X_MASK[:2], LABELS[:2]
    with torch.no_grad():
        a = plain(input_ids=x, attention_mask=xm, labels=labels).logits
        b = student.backbone(input_ids=x, attention_mask=xm, labels=labels).logits
    assert torch.equal(a, b)
