"""hypernet.encoder=multitask at the model: with an instruction adapter set, the student's instruction states (pooled
vector, T5 encoder states / LLaMA prefix K/V) are exactly those of the backbone with that LoRA merged in; the input
path, the trainable state and the plain encoding are untouched."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.errors import ConfigError
from tagi_ds.modeling.fusion import llama_instruction_pass
from tagi_ds.modeling.hypernet import masked_mean_pool
from tagi_ds.modeling.lora import merge_into_copy

from tests.tiny import make_student, rand_ids

INSTR = rand_ids((2, 6), 3)
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def random_adapter(student, r: int = 3, seed: int = 5) -> dict:
    """A PEFT-layout LoRA (A (L, r, d_in), B (L, d_out, r)) of rank `r` on every target module type."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mt in {s.module_type for s in student.specs}:
        specs = [s for s in student.specs if s.module_type == mt]
        n = max(s.layer for s in specs) + 1
        out[mt] = (torch.randn(n, r, specs[0].d_in, generator=g, dtype=torch.float64) * 0.3,
                   torch.randn(n, specs[0].d_out, r, generator=g, dtype=torch.float64) * 0.3)
    return out


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_instruction_states_are_the_merged_models(arch):
    student = make_student(arch).double().eval()  # float64: in float32 the hooked (W·x + s·B·A·x)
    # and merged ((W + s·B·A)·x) paths drift apart by ~1e-5 over the layers; merge_into_copy merges a float64 model in
    # float64 (it rounded ΔW to float32 before, 1.5e-5 off on one element in CI)
    plain = student.encode_instructions(INSTR, MASK)
    keys = set(student.trainable_state_dict())
    adapter, scale = random_adapter(student), 1.75  # the multitask LoRA's own scale, not the student's (2.0)
    student.set_instruction_adapter(adapter, scale)
    enc = student.encode_instructions(INSTR, MASK)
    merged = merge_into_copy(student.backbone, student.specs, {k: (a[None], b[None]) for k, (a, b) in adapter.items()},
                             0, scale).eval()
    with torch.no_grad():
        if arch == "t5":
            hidden = merged.encoder(input_ids=INSTR, attention_mask=MASK).last_hidden_state
        else:
            hidden, prefix = llama_instruction_pass(merged, INSTR, MASK)
            for (k, v), (k2, v2) in zip(enc.prefix, prefix):
                torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.pooled, masked_mean_pool(hidden, MASK), rtol=1e-5, atol=1e-5)
    assert (enc.pooled - plain.pooled).abs().max() > 1e-3  # the adapter does change what the hypernetwork reads
    assert set(student.trainable_state_dict()) == keys  # never saved with the hypernetwork
    assert student.hooks._state is None  # the hooks are free again for the generated adapters
    student.set_instruction_adapter(None)
    torch.testing.assert_close(student.encode_instructions(INSTR, MASK).pooled, plain.pooled, rtol=0, atol=0)


def test_a_trained_encoder_copy_refuses_the_adapter():
    student = make_student("llama", train_encoder=True)
    with pytest.raises(ConfigError, match="hypernet.encoder=multitask"):
        student.set_instruction_adapter(random_adapter(student), 2.0)
