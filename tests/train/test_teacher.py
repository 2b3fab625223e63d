"""Batched LoRA teachers: separable maths vs references, batched == one at a time, teachers beat the zero-shot
backbone on their own held-back instances, and the published adapter is a real PEFT adapter."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train.teacher_helpers import run_cfg
from tagi_ds.data.collate import IGNORE, collate_full
from tagi_ds.train import teacher
from tagi_ds.data.collate import assemble
from tagi_ds.train.teacher_batch import (BatchedTeacherTrainer, StackedLora, UnitSpec, clip_per_unit_,
                                         kaiming_uniform_bound, per_unit_loss)
from tagi_ds.modeling.label_logits import align_label_logits
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.prompts import encode_examples, prompt_settings
from tagi_ds.run.units import load_run_units, unit_seed


# ------------------------------------------------------------------------------------------------ pure maths
@pytest.mark.parametrize("causal", [False, True])
def test_per_unit_loss_is_each_units_own_token_mean(causal):
    g = torch.Generator().manual_seed(0)
    N, L, V, k = 7, 6, 11, 3
    logits = torch.randn(N, L, V, generator=g)
    labels = torch.randint(0, V, (N, L), generator=g)
    labels[torch.rand(N, L, generator=g) < 0.3] = IGNORE
    labels[:, 0] = 5  # every row keeps at least one label (after the causal shift too)
    labels[:, 1] = 6
    row_unit = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    got = per_unit_loss(align_label_logits(logits, labels, causal), row_unit, k)
    lg, lb = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
    for u in range(k):
        rows = row_unit == u
        ref = torch.nn.functional.cross_entropy(lg[rows].reshape(-1, V), lb[rows].reshape(-1), ignore_index=IGNORE)
        assert torch.allclose(got[u], ref, atol=1e-6)


def test_per_unit_clip_equals_clip_grad_norm_of_each_unit_alone():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(3, 2, 4, 5)), torch.nn.Parameter(torch.zeros(3, 2, 6, 4))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * torch.tensor([0.01, 1.0, 10.0]).view(3, 1, 1, 1)
    alone = []
    for i in range(3):
        ps = [torch.nn.Parameter(p[i].detach().clone()) for p in params]
        for p, q in zip(ps, params):
            p.grad = q.grad[i].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        alone.append([p.grad for p in ps])
    norms = clip_per_unit_(params, 1.0)
    assert norms[0] < 1.0 < norms[1] < norms[2]
    for i in range(3):
        for p, ref in zip(params, alone[i]):
            assert torch.allclose(p.grad[i], ref, atol=1e-6)


def test_lora_init_is_peft_kaiming_uniform_a_zero_b():
    from types import SimpleNamespace

    specs = [SimpleNamespace(module_type="self.q", layer=i, d_in=64, d_out=32) for i in range(2)]
    lora = StackedLora(specs, r=4, seeds=[7, 8])
    a, b = lora.A["0"], lora.B["0"]
    assert a.shape == (2, 2, 4, 64) and b.shape == (2, 2, 32, 4) and not b.any()
    bound = kaiming_uniform_bound(64)
    ref = torch.nn.init.kaiming_uniform_(torch.empty(4096, 64), a=math.sqrt(5))  # what PEFT's LoraLayer does
    assert abs(ref.abs().max().item() - bound) < 0.01 * bound
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert not torch.equal(a[0], a[1])  # units differ (own seeds) ...
    assert torch.equal(StackedLora(specs, 4, [8]).A["0"][0], a[1])  # ... and a unit's init ignores its batch


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_assembled_rows_are_collate_full(arch, tiny_backbone_dir, tmp_path):
    from transformers import AutoTokenizer

    bdir = tiny_backbone_dir(arch)
    cfg = run_cfg(tmp_path, bdir, arch)
    tok = AutoTokenizer.from_pretrained(bdir)
    task = load_run_units(cfg).tasks["synth_second"][0]
    settings = prompt_settings(cfg, arch)
    pairs = [(task, inst) for inst in task.instances[:5]]
    ref = collate_full(pairs, tok, settings)
    got = assemble(encode_examples(task.with_instances(task.instances[:5]), tok, settings), arch,
                   tok.pad_token_id)
    assert torch.equal(got["input_ids"], ref.input_ids)
    assert torch.equal(got["attention_mask"], ref.attention_mask)
    assert torch.equal(got["labels"], ref.labels)


# ------------------------------------------------------------------------------------------------ batched = alone
def _trainer(cfg, bb, ru, units, steps, pad_multiple=1):
    settings = prompt_settings(cfg, bb.arch)
    specs = [UnitSpec(u, [e for t in ru.tasks[u] for e in encode_examples(t, bb.tokenizer, settings)],
                      unit_seed(cfg.seed, u)) for u in units]
    return BatchedTeacherTrainer(bb.model, bb.arch, bb.specs, specs, r=cfg.lora.r, alpha=cfg.lora.alpha, lr=1e-2,
                                 steps=steps, batch_size=4, warmup_steps=2, grad_clip=0.05, pad_id=0, device="cpu",
                                 pad_to_multiple_of=pad_multiple)


# T5 with batch-dependent padding widths differs by up to 1.6e-5 after 6 steps (float32 summation order, amplified
# by Adam on near-zero gradients; see teacher_batch's docstring), so it is checked with fixed widths.
@pytest.mark.parametrize("arch,pad_multiple", [("llama", 1), ("t5", 64)])
def test_batched_teachers_end_exactly_as_trained_alone(arch, pad_multiple, tiny_backbone_dir, tmp_path):
    cfg = run_cfg(tmp_path, tiny_backbone_dir(arch), arch, "data.max_tasks=2")
    bb = load_run_backbone(cfg)
    ru = load_run_units(cfg)
    batched = _trainer(cfg, bb, ru, ru.units, steps=5, pad_multiple=pad_multiple)
    res = batched.train()
    batched.close()
    assert res.steps == 5 and len(ru.units) == 2
    for i, u in enumerate(ru.units):
        alone = _trainer(cfg, bb, ru, [u], steps=5, pad_multiple=pad_multiple)
        alone.train()
        alone.close()
        for (a_b, b_b), (a_1, b_1) in zip(batched.lora.unit(i).values(), alone.lora.unit(0).values()):
            assert b_1.abs().max() > 1e-4  # it trained (B starts at zero)
            assert torch.allclose(a_b, a_1, atol=1e-5, rtol=0) and torch.allclose(b_b, b_1, atol=1e-5, rtol=0)
        assert batched.losses[i] == pytest.approx(alone.losses[0], abs=1e-5)
    # grad_clip=0.05 is small, so the per-unit clip was active: a global clip would have broken the equality


# ------------------------------------------------------------------------------------------------ the stage
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_teachers_beat_the_zero_shot_backbone_on_held_back_instances(arch, tiny_backbone_dir, tmp_path, capsys):
    cfg = run_cfg(tmp_path, tiny_backbone_dir(arch), arch)  # teacher.steps=30
    out = teacher.run(cfg, progress=False)
    assert out == {"trained": ["synth_first", "synth_second", "synth_third"], "skipped": []}
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("teacher synth_")]
    with capsys.disabled():
        print(f"\n[{arch}] " + f"\n[{arch}] ".join(lines))
    for u in out["trained"]:
        d = cfg.run_dir / "teachers" / u
        assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "manifest.json", "metrics.json"]
        m = json.loads((d / "metrics.json").read_text())
        assert m["steps_done"] == 30 and m["held_back_instances"] == 8
        assert m["loss_last10"] < m["loss_first10"]
        assert m["teacher"]["loss"] < m["zero_shot"]["loss"] - 0.1  # learnt its own task
        assert 0.0 <= m["teacher"]["rougeL"] <= 100.0
        man = json.loads((d / "manifest.json").read_text())
        assert man["unit"] == u and man["data"]["tasks"] == [u] and len(man["hash"]) == 64
    assert list((cfg.run_dir / "tb" / "teacher").glob("events.out.tfevents*"))
    assert not (cfg.run_dir / "teachers" / ".ckpt").exists()  # checkpoints are removed once published


def test_published_teacher_is_a_peft_adapter_equal_to_the_hooks(tiny_backbone_dir, tmp_path):
    """PEFT itself loads the adapter, and its logits equal the backbone + BatchedLoraHooks with our tensors."""
    from peft import PeftModel

    from tagi_ds.run.peft_io import read_peft_adapter
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.modeling.lora import BatchedLoraHooks

    bdir = tiny_backbone_dir("llama")
    cfg = run_cfg(tmp_path, bdir, "llama", "teacher.steps=5", "data.max_tasks=1")
    teacher.run(cfg, progress=False)
    d = cfg.run_dir / "teachers" / "synth_first"
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(load_backbone(str(bdir))[0], str(d)).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        model, _ = load_backbone(str(bdir))
        specs = load_run_backbone(cfg).specs
        adapters, scale, r = read_peft_adapter(d, specs)
        assert r == 4 and scale == 2.0
        hooks = BatchedLoraHooks(model, specs, scale)
        with hooks.apply({k: (a[None], b[None]) for k, (a, b) in adapters.items()}, torch.zeros(2, dtype=torch.long)):
            got = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(base, ref, atol=1e-4)  # the adapter is not a no-op


def test_lora_dropout_is_applied_in_training_only(tiny_backbone_dir, tmp_path):
    cfg = run_cfg(tmp_path, tiny_backbone_dir("llama"), "llama", "data.max_tasks=1")
    bb = load_run_backbone(cfg)
    ru = load_run_units(cfg)
    settings = prompt_settings(cfg, "llama")
    unit = [UnitSpec("synth_first", encode_examples(ru.tasks["synth_first"][0], bb.tokenizer, settings), 3)]
    results = {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        tr = BatchedTeacherTrainer(bb.model, "llama", bb.specs, unit, r=4, alpha=8.0, dropout=p, lr=1e-2, steps=3,
                                   batch_size=4, warmup_steps=1, pad_id=0)
        tr.train()
        tr.close()
        results[p] = tr.lora.unit(0)
        assert all(not h for h in [m._forward_hooks for m in bb.model.modules()])  # every hook detached
    b0 = next(iter(results[0.0].values()))[1]
    b5 = next(iter(results[0.5].values()))[1]
    assert b0.abs().max() > 0 and b5.abs().max() > 0 and not torch.allclose(b0, b5)
