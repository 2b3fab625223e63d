"""Activation checkpointing of the frozen backbone (modeling/checkpointing.py): same loss and hypernetwork gradients
as without it, fewer saved activation bytes, generation untouched, and a finetune recipe run that matches."""
from __future__ import annotations

import json

import pytest
import torch

from tagi_ds.errors import ConfigError, TagiError
from tagi_ds.modeling.checkpointing import is_block_checkpointing
from tagi_ds.modeling.lora import merge_into_copy

from tests.tiny import make_student, rand_ids
from tests.tiny import randomize_b_heads
from tests.modeling.test_tagi import INSTR, INSTR_MASK, _batch

TASK_IDS = torch.tensor([1, 0, 2])


def saved_bytes(fn):
    """(fn(), bytes of the tensors autograd saved for backward outside any checkpointed region)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def train_step(arch: str, fusion: bool, checkpointing: bool, train_encoder: bool = False):
    """(loss, {trainable param name: grad}, saved bytes) of one forward + backward on the fixed mixed batch."""
    student = make_student(arch, fusion=fusion, train_encoder=train_encoder)
    randomize_b_heads(student)
    if checkpointing:
        student.enable_activation_checkpointing()
        assert is_block_checkpointing(student.backbone, arch)
    x, xm, labels = _batch(arch)

    def fwd():
        enc = student.encode_instructions(INSTR, INSTR_MASK)
        return student(enc, TASK_IDS, x, xm, labels=labels)

    out, nbytes = saved_bytes(fwd)
    out.loss.backward()
    assert all(p.grad is None for p in student.backbone.parameters())  # the backbone stays frozen
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, nbytes


@pytest.mark.parametrize("fusion", [True, False])
def test_same_loss_and_gradients_with_fewer_saved_bytes(arch, fusion):
    loss0, g0, b0 = train_step(arch, fusion, checkpointing=False)
    loss1, g1, b1 = train_step(arch, fusion, checkpointing=True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert set(g1) == set(g0) and len(g0) > 0 and all(n.startswith("hypernet.") for n in g0)
    assert sum(float(g.abs().sum()) for g in g0.values()) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert b1 < 0.75 * b0, (b0, b1)


def test_trained_instruction_encoder_gets_the_same_gradients():
    loss0, g0, _ = train_step("llama", True, checkpointing=False, train_encoder=True)
    loss1, g1, _ = train_step("llama", True, checkpointing=True, train_encoder=True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert any(n.startswith("instruction_encoder.") for n in g0) and set(g1) == set(g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_no_grad_forward_and_generation_unaffected(arch):
    outs = []
    for ck in (False, True):
        student = make_student(arch)
        randomize_b_heads(student)
        student.enable_activation_checkpointing(ck)
        x, xm, labels = _batch(arch)
        with torch.no_grad():
            enc = student.encode_instructions(INSTR, INSTR_MASK)
            logits = student(enc, TASK_IDS, x, xm, labels=labels).logits
        gx = rand_ids((3, 5), 21)
        gm = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]) if arch == "llama" else torch.ones_like(gx)
        tokens = student.generate(enc, TASK_IDS, gx, gm, max_new_tokens=4)
        outs.append((logits, tokens))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_switch_off_restores_the_class_forward_and_copies_stay_correct():
    student = make_student("llama")
    randomize_b_heads(student)
    enc = student.encode_instructions(INSTR, INSTR_MASK)
    adapters = {k: (a.detach(), b.detach()) for k, (a, b) in student.generate_adapters(enc).items()}
    x = rand_ids((2, 6), 31)
    ref = merge_into_copy(student.backbone, student.specs, adapters, 1, student.lora_scale)(input_ids=x).logits
    student.enable_activation_checkpointing()
    # a deep copy (merge) of a checkpointed backbone must run ITS blocks (with the merged weights), grad enabled
    merged = merge_into_copy(student.backbone, student.specs, adapters, 1, student.lora_scale)
    assert is_block_checkpointing(merged, "llama")
    torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=1e-6)
    student.enable_activation_checkpointing(False)
    assert not is_block_checkpointing(student.backbone, "llama")
    assert all("forward" not in b.__dict__ for b in student.backbone.model.layers)


def test_hf_checkpointing_is_still_refused():
    student = make_student("llama")
    student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(TagiError, match="gradient_checkpointing_disable"):
        student.enable_activation_checkpointing()
    x, xm, labels = _batch("llama")
    with pytest.raises(ConfigError, match="enable_activation_checkpointing"):
        student(student.encode_instructions(INSTR, INSTR_MASK), TASK_IDS, x, xm, labels=labels)


# ------------------------------------------------------------------------------------------- the recipe switch
def test_finetune_recipe_with_checkpointing_matches_the_plain_run(tmp_path):
    from tests.train import recipe_worker as W

    from tagi_ds.config import load_config
    from tagi_ds.train.finetune import run

    yaml, sets = W.tiny_finetune_run(tmp_path)
    losses = {}
    for ck in (False, True):
        cfg = load_config(yaml, sets + [f"backbone.gradient_checkpointing={str(ck).lower()}"])
        out = run(cfg, f"ck_{ck}", progress=False)
        recs = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
        losses[ck] = [(r["step"], r["loss"]) for r in recs]
    assert [s for s, _ in losses[True]] == [1, 2, 3]
    assert losses[True][0][1] > 0
    for (s0, l0), (s1, l1) in zip(losses[False], losses[True]):
        assert s0 == s1 and l1 == pytest.approx(l0, rel=1e-5, abs=1e-6), (losses[False], losses[True])
