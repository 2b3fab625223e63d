"""`model_label_logits`: the label logits of a teacher step, of cache writing and of the held-back loss. A causal
model's LM head runs over the label window alone, and still yields exactly what the full logits align to (the same
targets and rows, the same logits, the same gradients); T5 is unchanged."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.modeling.label_logits import IGNORE, align_label_logits, causal_label_window, model_label_logits

from tests.tiny import WORD_V, eager_llama, eager_t5


def _batch(prompt_lengths, target_lengths, width, seed=0):
    """Rows prompt + target, right-padded to `width`; labels = the target tokens, IGNORE elsewhere."""
    n = len(prompt_lengths)
    ids = torch.randint(4, WORD_V, (n, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompt_lengths, target_lengths)):
        mask[i, :p + t] = 1
        labels[i, p:p + t] = ids[i, p:p + t]
    return ids, mask, labels


def test_the_window_spans_the_positions_that_predict_a_label():
    _, _, labels = _batch([3, 9, 5, 12], [4, 2, 6, 3], 17)  # labels at 3..14
    assert causal_label_window(labels) == (2, 14)  # position 2 predicts label 3; 14 is the shift's last column
    assert causal_label_window(torch.full((2, 5), IGNORE)) == (0, 1)


def test_causal_window_equals_the_full_logits_with_the_same_gradients():
    model = eager_llama(seed=1).train()
    ids, mask, labels = _batch([3, 9, 5, 12], [4, 2, 6, 3], 17)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))

    def run(window: bool):
        model.zero_grad(set_to_none=True)
        if window:
            lg, tg, rows = model_label_logits(model, True, ids, mask, labels)
        else:
            lg, tg, rows = align_label_logits(model(input_ids=ids, attention_mask=mask).logits, labels, True)
        torch.nn.functional.cross_entropy(lg, tg).backward()
        return lg.detach(), tg, rows, [p.grad.clone() for p in model.parameters()]

    lg_w, tg_w, rows_w, g_w = run(True)
    lg_f, tg_f, rows_f, g_f = run(False)
    assert seen == [(4, 13), (4, 17)]  # the head read positions 2..14 only, then the full 17 for the reference
    assert lg_w.shape == lg_f.shape == (15, WORD_V)
    assert torch.equal(tg_w, tg_f) and torch.equal(rows_w, rows_f)
    torch.testing.assert_close(lg_w, lg_f, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_w, g_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_label_logits_equal_the_models_own_loss(arch):
    """The mean CE over the returned logits is the HF model's own label loss (its shift, its ignore index)."""
    model = eager_t5(seed=2) if arch == "t5" else eager_llama(seed=2)
    ids, mask, labels = _batch([5, 2, 7], [3, 6, 2], 12, seed=3)
    if arch == "t5":  # T5's labels are the target alone, left-aligned
        labels = torch.stack([torch.cat([r[r != IGNORE], torch.full((12,), IGNORE)])[:8] for r in labels])
    with torch.no_grad():
        lg, tg, rows = model_label_logits(model, arch == "llama", ids, mask, labels)
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(torch.bincount(rows), torch.tensor([3, 6, 2]))
    torch.testing.assert_close(torch.nn.functional.cross_entropy(lg, tg), ref, rtol=1e-5, atol=1e-6)
