"""The causal baseline's loss computed at the answer positions only (`baselines.causal_label_logits`) equals the loss
over the full logits (the PEFT model's own forward, then `label_positions`): same CE, same LoRA gradients."""
from __future__ import annotations

import torch

from tagi_ds.data.collate import IGNORE
from tagi_ds.modeling.label_logits import label_positions
from tagi_ds.train import baselines
from tagi_ds.train.losses import ce_sum


def _peft_llama():
    from peft import LoraConfig, get_peft_model

    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config

    cfg = tiny_llama_config(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64)
    torch.manual_seed(0)
    model = get_peft_model(build_from_config(cfg, seed=0, frozen=True),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="none"))
    for n, p in model.named_parameters():  # a non-zero B, so the LoRA terms reach the loss
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return model.double()


def _batch() -> baselines.BaselineBatch:
    """Right-padded prompt + answer rows of different lengths (labels -100 outside the answer)."""
    g = torch.Generator().manual_seed(1)
    rows = [(9, 4), (5, 6), (12, 1)]  # (prompt, answer) lengths
    width = max(p + a for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for i, (p, a) in enumerate(rows):
        ids[i, :p + a] = torch.randint(3, 300, (p + a,), generator=g)
        mask[i, :p + a] = 1
        labels[i, p:p + a] = ids[i, p:p + a]
    return baselines.BaselineBatch(ids, mask, labels)


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    ce, n = loss_fn()
    ce.backward()
    return ce.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_answer_position_logits_give_the_full_logits_loss_and_gradients():
    model, batch = _peft_llama(), _batch()

    def full():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return ce_sum(*label_positions(logits, batch.labels, "llama"))

    def answers_only():
        lg, targets, mask = baselines.causal_label_logits(model, batch)
        assert lg.shape[:2] == (3, 6)  # (N, longest answer), not (N, L)
        return ce_sum(lg, targets, mask)

    ce_ref, n_ref, g_ref = _loss_and_grads(model, full)
    ce, n, g = _loss_and_grads(model, answers_only)
    assert int(n) == int(n_ref) == 11
    torch.testing.assert_close(ce, ce_ref, rtol=1e-12, atol=1e-12)
    assert g.keys() == g_ref.keys() and len(g) == 8  # 2 layers x (q, v) x (A, B)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-12)
    assert any(v.abs().sum() > 0 for v in g.values())


def test_lora_step_reads_the_answer_positions_through_the_same_loss():
    model, batch = _peft_llama(), _batch()
    ce, n, _ = baselines.LoraStep(model, "llama")(batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    ref, n_ref = ce_sum(*label_positions(logits, batch.labels, "llama"))
    torch.testing.assert_close(ce, ref, rtol=1e-12, atol=1e-12)
    assert int(n) == int(n_ref)
