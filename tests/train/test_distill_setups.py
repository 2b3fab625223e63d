"""The official code's distillation set-ups as finetune options, at micro size (tiny LLaMA, 2 synthetic tasks):
- finetune.kl_teacher=multitask reads the tk_instruct baseline's adapter and its KL equals one computed by hand from
  that model (merged into a copy of the backbone, full prompt, dense T²·KL);
- hypernet.encoder=multitask gives the student exactly the baseline's adapter for its instruction pass;
- both refuse to start without the baseline, naming the command that trains it;
- a per-task input-only teacher's online KL reads the teacher on the instance part alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train import recipe_worker as W
from tagi_ds.config import load_config
from tagi_ds.errors import ArtifactMismatchError
from tagi_ds.modeling.label_logits import label_positions
from tagi_ds.modeling.lora import merge_into_copy
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.peft_io import read_peft_adapter, write_peft_adapter
from tagi_ds.train import finetune
from tagi_ds.train.engine_stage import train_stage
from tagi_ds.train.hypernet_loop import setup_student
from tagi_ds.train.losses import student_label_logits

T = 2.0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The micro finetune run plus a random 'tk_instruct' baseline adapter (alpha/r differs from the student's)."""
    root = tmp_path_factory.mktemp("setups")
    yaml, sets = W.tiny_finetune_run(root)
    cfg = load_config(yaml, sets)
    setup = setup_student(cfg, micro_batch=8, loop=cfg.finetune)
    g = torch.Generator().manual_seed(11)
    adapters = {}
    for s in setup.student.specs:
        if s.module_type not in adapters:
            n = max(x.layer for x in setup.student.specs if x.module_type == s.module_type) + 1
            adapters[s.module_type] = (torch.randn(n, 2, s.d_in, generator=g) * 0.3,
                                       torch.randn(n, s.d_out, 2, generator=g) * 0.3)
    write_peft_adapter(RunPaths.of(cfg).baseline("tk_instruct"), setup.student.specs, adapters, r=2, alpha=3.0,
                       base_model=cfg.backbone.name_or_path, task_type="CAUSAL_LM")
    return yaml, sets


def _built(cfg, variant: str):
    setup = setup_student(cfg, micro_batch=cfg.finetune.tasks_per_batch * cfg.finetune.instances_per_task,
                          loop=cfg.finetune)
    return setup, finetune.build_stage(cfg, variant, setup, None)


def _dense_kl_sum(t_lg, s_lg, mask) -> torch.Tensor:
    """Σ over label tokens of T²·KL(softmax(t/T) ‖ softmax(s/T)), written out."""
    t_lp = torch.log_softmax(t_lg.double() / T, -1)
    s_lp = torch.log_softmax(s_lg.double() / T, -1)
    return (T * T * (t_lp.exp() * (t_lp - s_lp)).sum(-1) * mask).sum()


def test_multitask_kl_teacher_is_the_baseline_on_the_full_prompt(run):
    yaml, sets = run
    cfg = load_config(yaml, sets + ["finetune.kl_teacher=multitask", "finetune.lambda_ins=0.0"])
    setup, spec = _built(cfg, "mt_kl")
    loss = spec.module.loss
    assert isinstance(loss, finetune.MultitaskTeacherLoss) and loss.signal is None  # no cache read
    student = setup.student
    batch = spec.batches.batch(0)
    full = batch.extra
    assert full is not None and full.input_ids.shape[1] > batch.input_ids.shape[1]  # the full Tk-Instruct prompt
    enc = student.encode_instructions(batch.instr_ids, batch.instr_mask)
    _, _, terms = loss(student, enc, batch)
    # by hand: the baseline merged into a copy of the backbone, every row on its full prompt
    folder = RunPaths.of(cfg).baseline("tk_instruct")
    ad, s_mt, r = read_peft_adapter(folder, student.specs)
    assert r == 2 and s_mt == pytest.approx(1.5) != student.lora_scale
    merged = merge_into_copy(student.backbone, student.specs, {k: (a[None], b[None]) for k, (a, b) in ad.items()},
                             0, s_mt)
    with torch.no_grad():
        t_lg, _, t_mask = label_positions(merged(input_ids=full.input_ids, attention_mask=full.attention_mask).logits,
                                          full.labels, "llama")
        s_lg, _, s_mask = student_label_logits(student, enc, batch)
    assert torch.equal(t_mask, s_mask)
    want = _dense_kl_sum(t_lg, s_lg, s_mask)
    assert float(want) > 0
    torch.testing.assert_close(terms["kl"].double(), want, rtol=1e-4, atol=1e-4)
    train_stage(setup, spec, show_progress=False)
    recs = [json.loads(x) for x in (spec.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["kl"] > 0 for r in recs)
    # what the finetune depends on includes the baseline's settings: another baselines.lr is another finetune
    other = load_config(yaml, sets + ["finetune.kl_teacher=multitask", "baselines.lr=0.1"])
    assert finetune.identity(other) != finetune.identity(cfg)
    plain = load_config(yaml, sets)
    assert "baselines" not in finetune.identity(plain)


def test_multitask_encoder_reads_instructions_through_the_baseline(run):
    yaml, sets = run
    cfg = load_config(yaml, sets + ["hypernet.encoder=multitask"])
    setup, spec = _built(cfg, "mt_enc")
    student = setup.student
    ad, s_mt, _ = read_peft_adapter(RunPaths.of(cfg).baseline("tk_instruct"), student.specs)
    assert student.instruction_adapter is not None
    for mt, (a, b) in ad.items():
        got_a, got_b = student.instruction_adapter[mt]
        assert torch.equal(got_a[0], a) and torch.allclose(got_b[0], b * (s_mt / student.lora_scale))
    batch = spec.batches.batch(0)
    enc = student.encode_instructions(batch.instr_ids, batch.instr_mask)
    student.set_instruction_adapter(None)
    plain = student.encode_instructions(batch.instr_ids, batch.instr_mask)
    assert (enc.pooled - plain.pooled).abs().max() > 1e-4


@pytest.mark.parametrize("option", ["finetune.kl_teacher=multitask", "hypernet.encoder=multitask"])
def test_missing_baseline_is_named_before_training(tmp_path, option):
    yaml, sets = W.tiny_finetune_run(tmp_path)
    cfg = load_config(yaml, sets + [option])
    with pytest.raises(ArtifactMismatchError, match=r"no trained tk_instruct baseline.*tagi-ds baselines"):
        finetune.run(cfg, "x", progress=False)
    assert not (cfg.run_dir / "finetune" / "x" / "export").exists()


def test_online_input_only_teacher_reads_the_instance_part(run):
    yaml, sets = run
    cfg = load_config(yaml, sets + ["finetune.online_teacher=true", "teacher.prompt=input"])
    setup, spec = _built(cfg, "online_input")
    batch = spec.batches.batch(0)
    full = batch.extra
    tok = setup.tokenizer
    text = tok.decode(full.input_ids[0][full.attention_mask[0].bool()], skip_special_tokens=True)
    assert text.startswith("Now complete the following example") and "Definition" not in text
    # the teacher's label positions carry the student's targets
    t_tg = label_positions(torch.zeros(*full.labels.shape, 1), full.labels, "llama")[1]
    s_tg = label_positions(torch.zeros(*batch.labels.shape, 1), batch.labels, "llama")[1]
    assert torch.equal(t_tg, s_tg)
