"""Teacher options at micro size (tiny T5 / LLaMA, synthetic tasks):
- teacher.prompt=input: a per-task teacher trained on the instance part alone; its cache shard holds, at exactly the
  student's label positions, the teacher read on THAT prompt, and the KL the finetune takes from it equals the dense
  KL of the live teacher; its manifest and the shard record the prompt; the report's teacher row reads it the same way;
- teacher.base=multitask: the teacher trains on the backbone with the tk_instruct baseline merged in (restored bit for
  bit afterwards), and its cache is that merged model + its LoRA."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train.teacher_helpers import run_cfg
from tagi_ds.data.collate import IGNORE, collate_full, collate_student
from tagi_ds.distill.losses import teacher_kl
from tagi_ds.distill.signal import CachedTeacherSignal
from tagi_ds.distill.sparse_kl import dense_kl
from tagi_ds.errors import ArtifactMismatchError
from tagi_ds.modeling.label_logits import label_positions
from tagi_ds.modeling.lora import merge_into_copy
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.peft_io import read_peft_adapter, write_peft_adapter
from tagi_ds.run.prompts import prompt_settings
from tagi_ds.run.units import load_run_units
from tagi_ds.train import cache_logits, teacher

TASK = "synth_reverse"


def _teacher_logits(model, arch, full):
    """(N, L, V) logits at the label positions of a FullPromptBatch, left-aligned, and the mask."""
    with torch.no_grad():
        if arch == "t5":
            logits = model(input_ids=full.input_ids, attention_mask=full.attention_mask, labels=full.labels).logits
        else:
            logits = model(input_ids=full.input_ids, attention_mask=full.attention_mask).logits
    lg, _, mask = label_positions(logits, full.labels, arch)
    return lg, mask


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_input_only_teacher_cache_is_read_on_its_own_prompt(arch, tiny_backbone_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tagi_ds.modeling.backbone import load_backbone

    bdir = tiny_backbone_dir(arch)
    vocab = json.loads((bdir / "config.json").read_text())["vocab_size"]
    # top-k = the whole vocabulary: the cached distribution is the teacher's, so its KL must be the dense one
    cfg = run_cfg(tmp_path, bdir, arch, "data.max_tasks=null", "teacher.steps=6", "teacher.prompt=input",
                  f"cache.top_k={vocab}", "data.max_target_length=3")
    teacher.run(cfg, task=TASK, progress=False)
    tdir = cfg.run_dir / "teachers" / TASK
    man = json.loads((tdir / "manifest.json").read_text())
    assert man["options"] == {"prompt": "input"}
    metrics = json.loads((tdir / "metrics.json").read_text())
    assert set(metrics["per_task"]) == {TASK} and metrics["teacher"]["exact_match"] == \
        metrics["per_task"][TASK]["exact_match"]
    assert cache_logits.run(cfg, task=TASK)["written"] == [TASK]
    shard_dir = cfg.run_dir / "logit_cache" / TASK
    assert json.loads((shard_dir / "manifest.json").read_text())["teacher_prompt"] == "input"

    tok = AutoTokenizer.from_pretrained(bdir)
    settings = prompt_settings(cfg, arch)
    task = load_run_units(cfg).tasks[TASK][0]
    pairs = [(task, inst) for inst in task.instances[:6]]
    student = collate_student(pairs, tok, settings)  # what the finetune's KL aligns with
    inputs = collate_full(pairs, tok, settings, with_instruction=False)  # what the teacher was trained on
    full = collate_full(pairs, tok, settings)
    assert inputs.input_ids.shape[1] < full.input_ids.shape[1]
    model = PeftModel.from_pretrained(load_backbone(str(bdir))[0], str(tdir)).eval()
    t_lg, t_mask = _teacher_logits(model, arch, inputs)
    s_tg_mask = (student.labels != IGNORE).sum(1)
    assert t_mask.sum(1).tolist() == s_tg_mask.tolist()  # one teacher row per student label position

    signal = CachedTeacherSignal(cfg.run_dir / "logit_cache")
    g = torch.Generator().manual_seed(0)
    s_lg = torch.randn(t_lg.shape, generator=g) * 2
    got = teacher_kl(s_lg, t_mask, signal, TASK, [i.id for _, i in pairs], 2.0)
    want = dense_kl(s_lg, t_lg, t_mask, 2.0)
    assert float(want) > 0.05
    torch.testing.assert_close(got, want.to(got.dtype), rtol=5e-3, atol=5e-3)  # float16 log-probs on disk
    # the cache holds the input-prompt reading, and the full-prompt reading of the same teacher is another one
    from tagi_ds.distill.logit_cache import CacheShardReader

    f_lg, f_mask = _teacher_logits(model, arch, full)
    assert torch.equal(f_mask, t_mask)
    shard = CacheShardReader(shard_dir)
    for row, (_, inst) in enumerate(pairs):
        got_lp, got_ids = shard.get(inst.id)
        lp_in = torch.log_softmax(t_lg[row][t_mask[row]] / 2.0, -1).gather(-1, got_ids)
        lp_full = torch.log_softmax(f_lg[row][f_mask[row]] / 2.0, -1).gather(-1, got_ids)
        assert torch.allclose(got_lp, lp_in, atol=1e-2) and (got_lp - lp_full).abs().max() > 5e-2


def test_a_full_prompt_teacher_folder_is_refused_for_an_input_run(tiny_backbone_dir, tmp_path):
    bdir = tiny_backbone_dir("llama")
    cfg = run_cfg(tmp_path, bdir, "llama", "data.max_tasks=1", "teacher.steps=2")
    teacher.run(cfg, progress=False)
    with pytest.raises(ArtifactMismatchError, match="another configuration"):
        teacher.run(run_cfg(tmp_path, bdir, "llama", "data.max_tasks=1", "teacher.steps=2", "teacher.prompt=input"),
                    progress=False)
    assert teacher.identity(cfg) != teacher.identity(run_cfg(tmp_path, bdir, "llama", "teacher.prompt=input"))


def test_teacher_on_the_multitask_model(tiny_backbone_dir, tmp_path):
    from tagi_ds.run.backbone import load_run_backbone

    bdir = tiny_backbone_dir("llama")
    cfg = run_cfg(tmp_path, bdir, "llama", "data.max_tasks=1", "teacher.steps=4", "teacher.base=multitask",
                  "cache.top_k=4", "data.max_target_length=3")
    with pytest.raises(ArtifactMismatchError, match="no trained tk_instruct baseline"):
        teacher.run(cfg, progress=False)
    bb = load_run_backbone(cfg)
    g = torch.Generator().manual_seed(3)
    mt_ad = {}
    for s in bb.specs:
        n = max(x.layer for x in bb.specs if x.module_type == s.module_type) + 1
        mt_ad.setdefault(s.module_type, (torch.randn(n, 4, s.d_in, generator=g) * 0.3,
                                         torch.randn(n, s.d_out, 4, generator=g) * 0.3))
    folder = RunPaths.of(cfg).baseline("tk_instruct")
    write_peft_adapter(folder, bb.specs, mt_ad, r=4, alpha=8.0, base_model=str(bdir), task_type="CAUSAL_LM")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    teacher.run(cfg, progress=False)
    task = load_run_units(cfg).tasks["synth_first"][0]
    man = json.loads((cfg.run_dir / "teachers" / task.name / "manifest.json").read_text())
    assert man["options"]["base"] == "multitask" and "baselines" in man["options"]["multitask"]
    cache_logits.run(cfg)
    # by hand: backbone + baseline merged, then + the teacher's LoRA merged, on the full prompt
    ad, s_mt, _ = read_peft_adapter(folder, bb.specs)
    t_ad, s_t, _ = read_peft_adapter(cfg.run_dir / "teachers" / task.name, bb.specs)
    one = lambda a: {k: (x[None], y[None]) for k, (x, y) in a.items()}  # noqa: E731
    ref = merge_into_copy(merge_into_copy(bb.model, bb.specs, one(ad), 0, s_mt), bb.specs, one(t_ad), 0, s_t).eval()
    for k, v in bb.model.state_dict().items():  # the run's backbone is back, bit for bit
        assert torch.equal(v, before[k]), k
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bdir)
    pairs = [(task, inst) for inst in task.instances[:4]]
    lg, mask = _teacher_logits(ref, "llama", collate_full(pairs, tok, prompt_settings(cfg, "llama")))
    from tagi_ds.distill.logit_cache import CacheShardReader

    shard = CacheShardReader(cfg.run_dir / "logit_cache" / task.name)
    for row, (_, inst) in enumerate(pairs):
        want_lp, want_ids = torch.log_softmax(lg[row][mask[row]].float() / 2.0, -1).topk(4, -1)
        got_lp, got_ids = shard.get(inst.id)
        assert torch.allclose(got_lp, want_lp, atol=1e-2) and torch.equal(got_ids[:, 0], want_ids[:, 0])


def test_shared_init_starts_every_teacher_from_one_a(tiny_backbone_dir, tmp_path):
    """teacher.init=shared: every teacher's LoRA A starts from one draw, so (A moving little in a short training)
    the published teachers' A are nearly equal, where per_unit's are unrelated draws; the data order stays each
    unit's own; the option is in the manifest, and a per_unit folder is refused for a shared run."""
    bdir = tiny_backbone_dir("llama")
    base = ["data.max_tasks=2", "teacher.steps=3"]

    def a_cosines(cfg) -> float:
        from tagi_ds.run.backbone import load_run_backbone

        bb = load_run_backbone(cfg)
        a = [read_peft_adapter(cfg.run_dir / "teachers" / u, bb.specs)[0] for u in load_run_units(cfg).units]
        assert len(a) == 2
        return min(float(torch.nn.functional.cosine_similarity(a[0][mt][0].flatten(), a[1][mt][0].flatten(), 0))
                   for mt in a[0])

    shared = run_cfg(tmp_path / "s", bdir, "llama", *base, "teacher.init=shared")
    own = run_cfg(tmp_path / "o", bdir, "llama", *base)
    teacher.run(shared, progress=False)
    teacher.run(own, progress=False)
    assert a_cosines(shared) > 0.95 and abs(a_cosines(own)) < 0.2
    unit = load_run_units(shared).units[0]
    man = json.loads((shared.run_dir / "teachers" / unit / "manifest.json").read_text())
    assert man["options"] == {"init": "shared"}
    assert "options" not in json.loads((own.run_dir / "teachers" / unit / "manifest.json").read_text())
    with pytest.raises(ArtifactMismatchError, match="another configuration"):
        teacher.run(run_cfg(tmp_path / "o", bdir, "llama", *base, "teacher.init=shared"), progress=False)
