"""Recipe pieces in one process: label alignment vs a per-row reference, token-summed CE, the online-teacher KL,
refusals with the right message. (Distributed behaviour: test_recipes_distributed.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import recipe_worker as W
from tagi_ds.config import load_config
from tagi_ds.data.tasks import Task
from tagi_ds.errors import ConfigError, TagiError
from tagi_ds.train.finetune import FinetuneTrainer, teacher_unit
from tagi_ds.train.hypernet_trainer import IGNORE, ce_sum, label_positions


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


def test_online_teacher_gives_the_dense_kl_of_the_live_teacher(llama_run):
    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.online_teacher=true"])
    tr = FinetuneTrainer(cfg, variant="online", show_progress=False)
    tr.setup()
    try:
        batch = tr.make_batch(tr.keys_for(0))
        total, n, terms = tr.module(batch)
        assert set(terms) == {"ce", "kl"} and float(terms["kl"]) > 0
        # reference: merge task 0's teacher into a copy of the backbone, run its full prompt, dense KL by hand
        from tagi_ds.modeling.lora import merge_into_copy
        from tagi_ds.train.hypernet_trainer import student_logits

        name = batch.task_names[0]
        ad, s_t = tr.teacher_adapter(name)
        merged = merge_into_copy(tr.student.backbone, tr.student.specs,
                                 {k: (a[None], b[None]) for k, (a, b) in ad.items()}, 0, s_t)
        full = batch.extra
        rows = (full.task_ids == 0).nonzero().squeeze(-1)
        with torch.no_grad():
            t_logits = merged(input_ids=full.input_ids[rows], attention_mask=full.attention_mask[rows]).logits
            t_lg, _, t_mask = label_positions(t_logits, full.labels[rows], "llama")
            s_lg, _, s_mask = label_positions(student_logits(tr.student, tr.encoding_for(tr.student, batch), batch),
                                              batch.labels, "llama")
            online = tr.online_teacher_logits(tr.student, batch)
        srow = (batch.task_ids == 0).nonzero().squeeze(-1)
        w = t_mask.shape[1]  # the task's own rows may be narrower than the whole batch
        assert torch.equal(t_mask, s_mask[srow][:, :w]) and not s_mask[srow][:, w:].any()
        torch.testing.assert_close(online[srow][:, :w][t_mask], t_lg[t_mask], rtol=1e-4, atol=1e-4)
        summary = tr.train()
        assert summary["final_step"] == 3 and set(summary["last_logged"]) == {"tokens", "loss", "ce", "kl"}
    finally:
        tr.cleanup()


def test_refusals_name_the_key(llama_run):
    yaml, sets = llama_run
    with pytest.raises(ConfigError, match="cache.temperature"):
        FinetuneTrainer(load_config(yaml, sets + ["finetune.temperature=1.0"]), variant="x")
    with pytest.raises(ConfigError, match="variant"):
        FinetuneTrainer(load_config(yaml, sets), variant="../up")


def test_plain_finetune_writes_metrics_and_an_export(llama_run):
    from tagi_ds.train.finetune import run

    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.lambda_ins=0.5"])
    out = run(cfg, variant="hint_ins", show_progress=False)
    recs = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all({"ce", "kl", "l_ins"} <= set(r) for r in recs)
    assert (out / "trainable.safetensors").is_file()


class _PoisonedFinetune(FinetuneTrainer):
    """A real finetune whose loss is replaced by nan on the chosen micro batches (as a bad batch or an overflow
    would make it): the guard must drop exactly those batches and train on."""

    poison: set = set()

    def loss_terms(self, student, batch):
        total, n, terms = super().loss_terms(student, batch)
        self._calls = getattr(self, "_calls", -1) + 1
        return (total * float("nan") if self._calls in self.poison else total), n, terms


def test_a_nan_batch_is_skipped_and_a_run_of_them_stops_with_a_clear_error(llama_run):
    yaml, sets = llama_run
    cfg = load_config(yaml, sets + ["finetune.lambda_ins=0.5"])
    tr = _PoisonedFinetune(cfg, variant="nan_once", show_progress=False)
    tr.poison = {1}
    tr.setup()
    summary = tr.train()
    assert summary["final_step"] == 3 and summary["skipped_nonfinite_batches"] == 1
    assert all(torch.isfinite(p).all() for p in tr.module.parameters())
    recs = [json.loads(x) for x in (tr.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)

    tr = _PoisonedFinetune(cfg, variant="nan_always", show_progress=False)
    tr.poison = set(range(1, 100))
    tr.setup()
    with pytest.raises(TagiError, match=r"non-finite on 5 batches in a row at step 2; lower the lr"):
        tr.train()
