"""cache-logits: the cached top-k equals an independent PEFT teacher at exactly the student's label positions (T5 and
LLaMA), and a SIGKILLed cache job leaves nothing under the final name and completes on rerun."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.teacher_helpers import cli_overrides, run_cfg
from tagi_ds.data.collate import IGNORE, collate_full, collate_student
from tagi_ds.distill.logit_cache import CacheShardReader
from tagi_ds.train import cache_logits, teacher
from tagi_ds.run.prompts import prompt_settings
from tagi_ds.run.units import load_run_units

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_cache_is_the_teachers_topk_at_the_students_label_positions(arch, tiny_backbone_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tagi_ds.modeling.backbone import load_backbone

    bdir = tiny_backbone_dir(arch)
    # reversed word lists are longer than 3 tokens: the truncation of labels must agree too
    cfg = run_cfg(tmp_path, bdir, arch, "data.max_tasks=null", "teacher.steps=6", "cache.top_k=5",
                  "data.max_target_length=3")
    teacher.run(cfg, task="synth_reverse", progress=False)
    out = cache_logits.run(cfg, task="synth_reverse")
    assert out["written"] == ["synth_reverse"]
    shard = CacheShardReader(cfg.run_dir / "logit_cache" / "synth_reverse")
    task = load_run_units(cfg).tasks["synth_reverse"][0]
    assert len(shard) == len(task.instances) and shard.k == 5 and shard.temperature == 2.0

    tok = AutoTokenizer.from_pretrained(bdir)
    settings = prompt_settings(cfg, arch)
    pairs = [(task, inst) for inst in task.instances[:6]]
    student = collate_student(pairs, tok, settings)  # the labels the finetune's KL aligns with
    n_labels = (student.labels != IGNORE).sum(1).tolist()
    assert [shard.length(i.id) for _, i in pairs] == n_labels
    assert max(n_labels) == 3 and max(len(tok(i.label, add_special_tokens=False)["input_ids"]) for _, i in pairs) > 3

    ref_model = PeftModel.from_pretrained(load_backbone(str(bdir))[0], str(cfg.run_dir / "teachers" / "synth_reverse"))
    full = collate_full(pairs, tok, settings)
    with torch.no_grad():
        if arch == "t5":
            logits = ref_model(input_ids=full.input_ids, attention_mask=full.attention_mask, labels=full.labels).logits
            lg, lb = logits, full.labels
        else:
            logits = ref_model(input_ids=full.input_ids, attention_mask=full.attention_mask).logits
            lg, lb = logits[:, :-1], full.labels[:, 1:]
    for row, (_, inst) in enumerate(pairs):
        pos = lb[row] != IGNORE
        assert torch.equal(lb[row][pos], student.labels[row][student.labels[row] != IGNORE])  # same label ids
        want_lp, want_ids = torch.log_softmax(lg[row][pos].float() / 2.0, -1).topk(5, -1)
        got_lp, got_ids = shard.get(inst.id)
        assert torch.allclose(got_lp, want_lp, atol=1e-2)  # stored as float16
        assert torch.equal(got_ids[:, 0], want_ids[:, 0])


def _wait_for(pred, proc, timeout=120.0, poll=0.02):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def test_cache_killed_mid_shard_leaves_no_final_name_and_completes_on_rerun(tiny_backbone_dir, tmp_path):
    bdir = tiny_backbone_dir("llama")
    # one task with many instances and batch 1: the writer is busy long enough to be killed mid-shard
    extra = ("data.max_tasks=1", "data.synthetic.instances_per_task=400", "teacher.steps=2", "cache.batch_size=1")
    cfg = run_cfg(tmp_path, bdir, "llama", *extra)
    teacher.run(cfg, progress=False)
    (tmp_path / "c.yaml").write_text("{}\n")
    cmd = [PY, "-m", "tagi_ds.cli", "cache-logits", "--config", str(tmp_path / "c.yaml"), "task=synth_first",
           *cli_overrides(bdir, "llama", tmp_path, *extra)]
    cache_root = cfg.run_dir / "logit_cache"

    def writing() -> bool:
        tmps = list(cache_root.glob(".synth_first.*.tmp")) if cache_root.is_dir() else []
        return any((t / "logprobs.bin").is_file() and (t / "logprobs.bin").stat().st_size > 0 for t in tmps)

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        caught = _wait_for(writing, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert caught, f"never saw the shard being written: {proc.stdout.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (cache_root / "synth_first").exists()  # nothing under the final name
    assert list(cache_root.glob(".synth_first.*.tmp"))  # only the hidden temp folder of the killed writer

    out = cache_logits.run(cfg, task="synth_first")
    assert out["written"] == ["synth_first"]
    shard = CacheShardReader(cache_root / "synth_first")  # verifies every checksum
    assert len(shard) == 392 and not list(cache_root.glob(".synth_first.*.tmp"))  # stale temp removed
