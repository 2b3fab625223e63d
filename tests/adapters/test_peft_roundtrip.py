"""A generated adapter exported as a PEFT directory gives, in peft.PeftModel, the logits of the TAGI student
without fusion (and, with fusion on, visibly not the full student's: the README note)."""
from __future__ import annotations

import json

import pytest
import torch

from tagi_ds.adapters.generate import ADAPTER_META, task_slice, write_generated_adapter
from tagi_ds.run.peft_io import ADAPTER_CONFIG

from tests.adapters.adapters_helpers import ALPHA, R, make_student, tiny_backbone


def _ids(shape, seed):
    return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_peft_model_matches_student_without_fusion(arch, tmp_path):
    from peft import PeftModel

    student = make_student(tiny_backbone(arch), arch, fusion=False)
    instr, instr_mask = _ids((1, 9), 1), torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        enc = student.encode_instructions(instr, instr_mask)
        adapters = student.generate_adapters(enc)
    out = write_generated_adapter(student, task_slice(adapters, 0), tmp_path / "adapter", r=R, alpha=ALPHA,
                                  base_model="tiny", meta={"instruction": "x"})
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM")
    assert json.loads((out / ADAPTER_META).read_text())["fusion"] is False

    x, mask = _ids((3, 7), 2), torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # one padded row
    tids = torch.zeros(3, dtype=torch.long)
    fresh = tiny_backbone(arch)  # same seed → same weights as the student's backbone
    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        if arch == "t5":
            dec = _ids((3, 5), 3)
            want = student(enc, tids, x, mask, decoder_input_ids=dec).logits
            got = peft_model(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits
        else:
            want = student(enc, tids, x, mask).logits
            got = peft_model(input_ids=x, attention_mask=mask).logits
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=x, attention_mask=mask).logits
    keep = mask.bool() if arch == "llama" else torch.ones(3, 5, dtype=torch.bool)  # padded positions: not compared
    assert (got - want)[keep].abs().max().item() < 1e-5
    assert (plain - want)[keep].abs().max().item() > 1e-3  # the adapter really changes the model


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_fusion_is_not_in_the_peft_adapter(arch, tmp_path):
    """With fusion the full student attends to the instruction states too; the PEFT adapter alone cannot."""
    from peft import PeftModel

    student = make_student(tiny_backbone(arch), arch, fusion=True)
    instr, instr_mask = _ids((1, 9), 1), torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        enc = student.encode_instructions(instr, instr_mask)
        adapters = student.generate_adapters(enc)
    out = write_generated_adapter(student, task_slice(adapters, 0), tmp_path / "adapter", r=R, alpha=ALPHA,
                                  base_model="tiny")
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["fusion"] is True and "predict" in meta["note"]
    x, mask, tids = _ids((2, 6), 2), torch.ones(2, 6, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    peft_model = PeftModel.from_pretrained(tiny_backbone(arch), str(out)).eval()
    with torch.no_grad():
        kw = {"decoder_input_ids": _ids((2, 4), 3)} if arch == "t5" else {}
        fused = student(enc, tids, x, mask, **kw).logits
        student.fusion = False
        unfused = student(enc, tids, x, mask, **kw).logits
        got = peft_model(input_ids=x, attention_mask=mask, **kw).logits
    assert (got - unfused).abs().max().item() < 1e-5
    assert (got - fused).abs().max().item() > 1e-3
