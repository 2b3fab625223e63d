"""predict's one-task path: the adapter merged into a copy of the weights gives the hooks' logits (fusion kept),
with no LoRA hook left on the model that runs, and the original backbone restored afterwards."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.adapters.predict import merged_backbone

from tests.adapters.adapters_helpers import make_student, tiny_backbone


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_merged_backbone_matches_hooks(arch):
    student = make_student(tiny_backbone(arch), arch, fusion=True)
    g = torch.Generator().manual_seed(0)
    instr, x = torch.randint(3, 250, (1, 8), generator=g), torch.randint(3, 250, (3, 6), generator=g)
    ones = torch.ones_like
    enc = student.encode_instructions(instr, ones(instr))
    with torch.no_grad():
        adapters = student.generate_adapters(enc)
    tids = torch.zeros(3, dtype=torch.long)
    kw = {"decoder_input_ids": torch.randint(3, 250, (3, 4), generator=g)} if arch == "t5" else {}
    original = student.backbone
    with torch.no_grad():
        hooked = student(enc, tids, x, ones(x), adapters=adapters, **kw).logits
        with merged_backbone(student, adapters):
            assert student.backbone is not original
            assert not any(getattr(h, "is_tagi_lora_hook", False)
                           for m in student.backbone.modules() for h in m._forward_hooks.values())
            merged = student(enc, tids, x, ones(x), adapters=adapters, **kw).logits
        assert student.backbone is original
        zero = {mt: (a, torch.zeros_like(b)) for mt, (a, b) in adapters.items()}
        plain = student(enc, tids, x, ones(x), adapters=zero, **kw).logits
    scale = hooked.abs().max().item()
    # merging changes the order of the float32 sums (W+ΔW)x vs Wx+ΔWx: relative, not bitwise, agreement
    assert (merged - hooked).abs().max().item() < 5e-5 * max(1.0, scale)
    assert (plain - hooked).abs().max().item() > 1e-3
