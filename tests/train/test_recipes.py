"""Recipe pieces in one process: label alignment vs a per-row reference, token-summed CE, the online-teacher KL,
refusals with the right message. (Distributed behaviour: test_recipes_distributed.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train import recipe_worker as W
from tagi_ds.config import load_config
from tagi_ds.data.tasks import Task
from tagi_ds.errors import ArtifactMismatchError, ConfigError, DataError, TagiError
from tagi_ds.run.units import teacher_unit
from tagi_ds.train import finetune
from tagi_ds.train.engine_stage import train_stage
from tagi_ds.train.hypernet_loop import setup_student
from tagi_ds.modeling.label_logits import IGNORE, label_positions
from tagi_ds.train.losses import ce_sum


def test_label_positions_causal_matches_per_row_reference():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 9, 11
    logits = torch.randn(N, T, V, generator=g)
    labels = torch.full((N, T), IGNORE)
    spans = [(2, 5), (4, 9), (1, 2)]  # [start, end) of each row's target tokens in input positions
    for i, (a, b) in enumerate(spans):
        labels[i, a:b] = torch.randint(0, V, (b - a,), generator=g)
    lg, tg, mask = label_positions(logits, labels, "llama")
    assert mask.sum(1).tolist() == [b - a for a, b in spans]
    for i, (a, b) in enumerate(spans):
        n = b - a
        torch.testing.assert_close(lg[i, :n], logits[i, a - 1:b - 1])  # logits[t] predicts token t+1
        assert torch.equal(tg[i, :n], labels[i, a:b])
    s, n = ce_sum(lg, tg, mask)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                          reduction="sum")
    torch.testing.assert_close(s, ref)
    assert int(n) == sum(b - a for a, b in spans)


def test_label_positions_t5_is_identity_on_left_aligned_labels():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[3, 4, 1, IGNORE], [5, 1, IGNORE, IGNORE]])
    lg, tg, mask = label_positions(logits, labels, "t5")
    assert lg is logits and mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert tg[mask].tolist() == [3, 4, 1, 5, 1]


def test_teacher_unit_by_task_or_category():
    t = Task(name="task1", definition="d", positive_examples=[], negative_examples=[], instances=[],
             categories=["Sentiment Analysis"])
    assert teacher_unit(t, "task") == "task1" and teacher_unit(t, "category") == "Sentiment Analysis"
    bare = Task(name="t2", definition="d", positive_examples=[], negative_examples=[], instances=[], categories=[])
    with pytest.raises(ConfigError, match="t2"):
        teacher_unit(bare, "category")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> tuple[Path, list[str]]:
    return W.tiny_finetune_run(tmp_path_factory.mktemp("recipes_local"))


def _built(cfg, variant: str):
    """(setup, stage spec) of a finetune, as `finetune.run` builds them before training."""
    setup = setup_student(cfg, micro_batch=cfg.finetune.tasks_per_batch * cfg.finetune.instances_per_task,
                          loop=cfg.finetune)
    return setup, finetune.build_stage(cfg, variant, setup, None)


def test_online_teacher_gives_the_dense_kl_of_the_live_teacher(llama_run):
    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.online_teacher=true"])
    setup, spec = _built(cfg, "online")
    student = setup.student
    batch = spec.batches.batch(0)
    encoding = student.encode_instructions(batch.instr_ids, batch.instr_mask)
    total, n, terms = spec.module.loss(student, encoding, batch)
    assert set(terms) == {"ce", "kl"} and float(terms["kl"]) > 0
    # reference: merge task 0's teacher into a copy of the backbone, run its full prompt, dense KL by hand
    from tagi_ds.modeling.lora import merge_into_copy
    from tagi_ds.train.losses import student_label_logits

    name = batch.task_names[0]
    ad, s_t = spec.module.loss.teachers.get(name)
    merged = merge_into_copy(student.backbone, student.specs, {k: (a[None], b[None]) for k, (a, b) in ad.items()},
                             0, s_t)
    full = batch.extra
    rows = (full.task_ids == 0).nonzero().squeeze(-1)
    with torch.no_grad():
        t_logits = merged(input_ids=full.input_ids[rows], attention_mask=full.attention_mask[rows]).logits
        t_lg, _, t_mask = label_positions(t_logits, full.labels[rows], "llama")
        s_lg, _, s_mask = student_label_logits(student, encoding, batch)
        online = spec.module.loss.online_teacher_logits(student, batch)
    srow = (batch.task_ids == 0).nonzero().squeeze(-1)
    w = t_mask.shape[1]  # the task's own rows may be narrower than the whole batch
    assert torch.equal(t_mask, s_mask[srow][:, :w]) and not s_mask[srow][:, w:].any()
    torch.testing.assert_close(online[srow][:, :w][t_mask], t_lg[t_mask], rtol=1e-4, atol=1e-4)
    train_stage(setup, spec, show_progress=False)
    summary = json.loads((spec.out_dir / "summary.json").read_text())
    assert summary["final_step"] == 3 and set(summary["last_logged"]) == {"tokens", "loss", "ce", "kl"}


def test_refusals_name_the_key(llama_run):
    yaml, sets = llama_run
    with pytest.raises(ConfigError, match="cache.temperature"):
        finetune.run(load_config(yaml, sets + ["finetune.temperature=1.0"]), "x")
    with pytest.raises(DataError, match="up"):
        finetune.run(load_config(yaml, sets), "../up")


def test_plain_finetune_writes_metrics_and_an_export(llama_run):
    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.lambda_ins=0.5"])
    out = finetune.run(cfg, "hint_ins", progress=False)
    recs = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all({"ce", "kl", "l_ins"} <= set(r) for r in recs)
    assert (out / "trainable.safetensors").is_file()


def _poisoned(spec, poison: set):
    """The spec with its loss replaced by nan on the chosen micro batches (as a bad batch or an overflow would make
    it): the guard must drop exactly those batches and train on."""
    calls = [-1]
    real = spec.module.loss

    def loss(student, encoding, batch):
        total, n, terms = real(student, encoding, batch)
        calls[0] += 1
        return (total * float("nan") if calls[0] in poison else total), n, terms
    spec.module.loss = loss
    return spec


def test_a_nan_batch_is_skipped_and_a_run_of_them_stops_with_a_clear_error(llama_run):
    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.lambda_ins=0.5"])
    setup, spec = _built(cfg, "nan_once")
    train_stage(setup, _poisoned(spec, {1}), show_progress=False)
    summary = json.loads((spec.out_dir / "summary.json").read_text())
    assert summary["final_step"] == 3 and summary["skipped_nonfinite_batches"] == 1
    assert all(torch.isfinite(p).all() for p in setup.student.parameters())
    recs = [json.loads(x) for x in (spec.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)

    setup, spec = _built(cfg, "nan_always")
    with pytest.raises(TagiError, match=r"non-finite on 5 batches in a row at step 2; lower the lr"):
        train_stage(setup, _poisoned(spec, set(range(1, 100))), show_progress=False)


@pytest.mark.parametrize("mode", ["sampled", "priority"])
def test_a_sampled_cache_drives_the_kl_through_the_same_loss_path(tmp_path, mode):
    """The cache mode is a config choice end to end: shards written in that mode (the cache stage's writer), the
    finetune's expected manifest names it, and the KL term trains from it."""
    extra = ["cache.mode=" + mode, "cache.num_samples=16", "cache.top_k=16"]
    yaml, sets = W.tiny_finetune_run(tmp_path, *extra)
    cfg = load_config(yaml, sets)
    shard = next((cfg.run_dir / "logit_cache").iterdir())
    assert json.loads((shard / "manifest.json").read_text())["mode"] == mode
    out = finetune.run(cfg, "sampled_kl", progress=False)
    recs = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["kl"]) for r in recs)
    with pytest.raises(ArtifactMismatchError, match="mode"):  # a top-k run refuses the other mode's shards
        finetune.run(load_config(yaml, sets + ["cache.mode=topk"]), "topk_on_sampled", progress=False)


def test_teachers_are_read_ahead_hashed_once_and_bounded_in_bytes(llama_run):
    """Start-up hashes no teacher (the cheap manifest check); each teacher's weights are hashed once per job, when its
    shard is first read, and read ahead of the step that needs them; the adapter LRU holds at most its byte budget."""
    from tagi_ds.run import artifacts

    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.lambda_ins=0.5", "finetune.teacher_cache_gib=1e-9"])
    artifacts._file_sha256.cache_clear()
    setup, spec = _built(cfg, "read_ahead")
    assert artifacts._file_sha256.cache_info().misses == 0  # nothing hashed at start-up
    train_stage(setup, spec, show_progress=False)
    summary = json.loads((spec.out_dir / "summary.json").read_text())
    info = artifacts._file_sha256.cache_info()
    assert info.misses == 2 and info.hits >= 0  # the run's 2 teachers, once each
    reads = summary["teacher_reads"]
    assert reads["reads"] >= 3 and reads["waited_s"] < 30  # each step's teachers were read (ahead)
    assert len(spec.module.loss.teachers._cache) == 1  # a budget below one adapter keeps just the last one


def test_a_retrained_teacher_is_refused_at_start_up_and_an_untouched_one_is_not_hashed(llama_run):
    """The start-up trusts a teacher whose weights' stat matches the one its shard recorded; a teacher retrained
    after its cache (new weights, new mtime) is hashed there and refused, naming the shard and the field."""
    import os

    from tagi_ds.run import artifacts
    from tagi_ds.run.paths import RunPaths

    yaml, sets = llama_run
    cfg = load_config(yaml, sets)
    weights = RunPaths.of(cfg).teacher(cfg_task := sorted(p.name for p in RunPaths.of(cfg).logit_cache.iterdir())[0])
    weights = weights / "adapter_model.safetensors"
    before, st = weights.read_bytes(), weights.stat()
    try:
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        save_file({k: v + 0.01 for k, v in tensors.items()}, weights)  # the retrained teacher
        artifacts._file_sha256.cache_clear()
        with pytest.raises(ArtifactMismatchError, match=f"{cfg_task}.*teacher_adapter_hash"):
            _built(cfg, "retrained")
        assert artifacts._file_sha256.cache_info().misses == 1  # only the changed teacher was hashed
    finally:
        weights.write_bytes(before)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    artifacts._file_sha256.cache_clear()
    _built(cfg, "restored")
    assert artifacts._file_sha256.cache_info().misses == 0


def test_pretrain_input_has_one_bos_after_the_prefix_and_keeps_it_without_fusion(llama_run):
    """Issue 18 (minor): stage 1 fed the fused LLaMA student [bos a ; bos b c]. With fusion the input starts at b
    (the prefix row opens with bos); without fusion it is the whole sequence and opens with bos."""
    from tagi_ds.train.pretrain import PretrainBatches
    from transformers import AutoTokenizer

    yaml, sets = llama_run
    cfg = load_config(yaml, sets)
    tok = AutoTokenizer.from_pretrained(cfg.backbone.tokenizer or cfg.backbone.name_or_path)
    fused = PretrainBatches(cfg.data, tok, "llama", micro_batch_size=2, seed=0, after_prefix=True).batch(0)
    alone = PretrainBatches(cfg.data, tok, "llama", micro_batch_size=2, seed=0, after_prefix=False).batch(0)
    bos = tok.bos_token_id
    for row in range(fused.input_ids.shape[0]):
        instr = fused.instr_ids[row][fused.instr_mask[row].bool()]
        x = fused.input_ids[row][fused.attention_mask[row].bool()]
        assert instr[0] == bos and int((torch.cat([instr, x]) == bos).sum()) == 1
        y = alone.input_ids[row][alone.attention_mask[row].bool()]
        assert y[0] == bos and torch.equal(y[1:], x)
        # the labels move with the input: the same target tokens, one column earlier
        assert torch.equal(alone.labels[row][1:len(x) + 1], fused.labels[row][:len(x)])


def test_the_encoding_cache_trains_the_same_losses_and_skips_repeated_instruction_passes(llama_run):
    """finetune.encoding_cache_mib > 0: a micro batch whose instructions were all encoded before reuses them (the
    backbone is frozen: the same encodings), so the run's losses equal an uncached run's."""
    yaml, sets = llama_run
    losses, hits = {}, {}
    for mib in (0, 16):
        cfg = load_config(yaml, sets + [f"finetune.encoding_cache_mib={mib}", "finetune.steps=6",
                                        "finetune.tasks_per_batch=1"])
        setup, spec = _built(cfg, f"enc{mib}")
        train_stage(setup, spec, show_progress=False)
        recs = [json.loads(x) for x in (spec.out_dir / "metrics.jsonl").read_text().splitlines()]
        losses[mib] = [r["loss"] for r in recs]
        hits[mib] = spec.module.encodings.stats["hits"]
    assert len(losses[0]) == 6 and hits[0] == 0 and hits[16] > 0
    assert losses[16] == pytest.approx(losses[0], rel=1e-5)
