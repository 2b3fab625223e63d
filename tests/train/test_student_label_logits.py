"""The student's LLaMA logits are computed over the window of positions that predict a label (the LM head over
those alone): the same label logits and the same hypernetwork gradients as the full (N, L, V) logits."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tagi_ds.modeling.label_logits import IGNORE, label_positions
from tagi_ds.train.losses import ce_sum, student_label_logits

from tests.tiny import make_student, rand_ids, randomize_b_heads


def _batch(prompt_lengths, target_lengths, width):
    """Rows prompt + target, right-padded to `width`; labels = the target tokens, IGNORE elsewhere."""
    n = len(prompt_lengths)
    ids = rand_ids((n, width), 31)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompt_lengths, target_lengths)):
        mask[i, :p + t] = 1
        labels[i, p:p + t] = ids[i, p:p + t]
    return SimpleNamespace(input_ids=ids, attention_mask=mask, labels=labels,
                           task_ids=torch.tensor([0, 0, 1, 1][:n]))


def test_window_logits_equal_the_full_logits_and_their_gradients():
    student = make_student("llama")
    randomize_b_heads(student)
    instr = rand_ids((2, 7), 30)
    batch = _batch([3, 9, 5, 12], [4, 2, 6, 3], 17)  # labels at positions 3..14 (the rows' answers end at 6..14)
    params = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grads(window: bool):
        student.zero_grad(set_to_none=True)
        enc = student.encode_instructions(instr, torch.ones_like(instr))
        if window:
            lg, tg, mk = student_label_logits(student, enc, batch)
        else:
            full = student(enc, batch.task_ids, batch.input_ids, batch.attention_mask).logits  # (N, L, V)
            lg, tg, mk = label_positions(full, batch.labels, "llama")
        ce, n = ce_sum(lg, tg, mk)
        ce.backward()
        return lg, tg, mk, ce.detach(), [p.grad.clone() for p in params]

    lg_w, tg_w, mk_w, ce_w, g_w = loss_and_grads(True)
    lg_f, tg_f, mk_f, ce_f, g_f = loss_and_grads(False)
    assert lg_w.shape == lg_f.shape == (4, 6, lg_f.shape[-1])
    assert torch.equal(mk_w, mk_f) and torch.equal(tg_w, tg_f)
    torch.testing.assert_close(lg_w[mk_w], lg_f[mk_f], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_w, ce_f, rtol=1e-6, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in g_w[:1])
    for a, b in zip(g_w, g_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_lm_head_runs_over_the_window_only():
    student = make_student("llama")
    instr = rand_ids((2, 7), 30)
    batch = _batch([3, 9, 5, 12], [4, 2, 6, 3], 17)
    seen = []
    student.backbone.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
    with torch.no_grad():
        student_label_logits(student, student.encode_instructions(instr, torch.ones_like(instr)), batch)
    assert seen == [(4, 13)]  # positions 2..14 of 17: the first predicts label 3, the last is label 14
