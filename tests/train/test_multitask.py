"""The multitask baselines: answer-only loss, training that lowers the loss (LoRA and full), greedy prediction."""
from __future__ import annotations

import json
import time
import types

import pytest
import torch

from tagi_ds.data.synthetic import build_suite, task_weights
from tagi_ds.errors import ConfigError
from tagi_ds.train import multitask as mt
from tagi_ds.train.schedule import lr_multiplier
from tagi_ds.train.backbone_stage import build_tiny_backbone


@pytest.fixture(scope="module")
def suite():
    return build_suite(instances_per_task=12, held_back_per_task=2)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "backbone"
    # a huge time budget: the 60 steps decide, so the fixture is the same however loaded the machine is
    build_tiny_backbone(path, seed=0, hidden=32, layers=2, heads=2, ffn=64, vocab=500, copy_seconds=1e6,
                        copy_lr=5e-3, copy_batch=8, max_steps=60, progress=False)
    return path


def test_prompts_differ_only_by_the_instruction(suite):
    t = suite.train[0]
    inst = t.instances[0]
    full, bare = mt.prompt_for(t, inst, "tk_instruct"), mt.prompt_for(t, inst, "no_instruction")
    assert full.endswith(bare) and full.startswith("Definition: ") and "Definition" not in bare
    with pytest.raises(ConfigError, match="mode"):
        mt.prompt_for(t, inst, "hint")


def test_encode_pair_puts_the_loss_on_the_answer_only(backbone, suite):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    inst = suite.train[9].instances[0]  # reverse: a multi-word answer
    enc = mt.encode_pair(tok, mt.prompt_for(suite.train[9], inst, "no_instruction"), inst.label, False)
    answer = [t for t in enc.labels if t != mt.IGNORE]
    assert enc.labels[:len(enc.labels) - len(answer)] == [mt.IGNORE] * (len(enc.labels) - len(answer))
    assert enc.input_ids[-len(answer):] == answer and answer[-1] == tok.eos_token_id
    assert tok.decode(answer, skip_special_tokens=True) == inst.label
    # the prompt is exactly the tokens generation is fed
    assert enc.input_ids[:-len(answer)] == mt.encode_prompt(tok, mt.prompt_for(suite.train[9], inst,
                                                                                "no_instruction"), False, 512)
    batch = mt.collate([enc, mt.encode_pair(tok, "Input: a.\nOutput: ", "b", False)], tok.pad_token_id, False)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_train_multitask_lowers_the_loss_and_predicts(backbone, suite, tmp_path, full):
    # Two tasks with few distinct answers (count, is-sorted): 30 small steps are enough to move even LoRA on a
    # barely pretrained backbone, while the full 28-task mix only moves in the noise at this size.
    tasks = [t for t in suite.train if t.meta["ops"] in (["count"], ["is_sorted"])]
    out = mt.train_multitask(backbone, tasks, tmp_path / "model", mode="tk_instruct", steps=30, lr=1e-2, batch=8,
                             full=full,
                             lora=(16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")),
                             task_weights=task_weights(tasks), warmup_steps=3, device="cpu", progress=False,
                             tb_dir=tmp_path / "tb")
    stats = json.loads((out / "train.json").read_text())
    assert stats["steps"] == 30 and stats["loss_last10"] < stats["loss_first10"] - 0.5
    assert (out / ("model.safetensors" if full else "adapter_model.safetensors")).exists()
    preds = mt.predict_multitask(out, suite.unseen_composition[:2], mode="tk_instruct", max_instances_per_task=3,
                                 max_new_tokens=6, device="cpu")
    assert list(preds) == [t.name for t in suite.unseen_composition[:2]]
    assert all(len(p) == 3 and all(isinstance(s, str) for s in p) for p in preds.values())
    scores = mt.score_predictions(suite.unseen_composition[:2], preds)
    assert set(scores) >= {"rougeL", "exact_match"}


def test_time_budget_stops_training(backbone, suite, tmp_path):
    out = mt.train_multitask(backbone, suite.train, tmp_path / "m", mode="no_instruction", steps=10_000, lr=1e-3,
                             batch=4, full=True, time_budget_s=1.0, device="cpu", progress=False)
    stats = json.loads((out / "train.json").read_text())
    assert 0 < stats["steps"] < 10_000 and stats["seconds"] < 5


class _Quadratic(torch.nn.Module):
    """loss = |w|^2: enough for train_loop, which reads `model(**batch).loss`."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return types.SimpleNamespace(loss=(self.w * x).pow(2).sum())


class _LrLog:
    def __init__(self):
        self.lr = {}

    def advance(self):
        pass

    def log_scalars(self, step, scalars):
        self.lr[step] = scalars["lr"]


@pytest.mark.parametrize("anneal", [False, True])
def test_a_time_cap_anneals_the_lr_only_when_asked(anneal):
    # The baselines' budget is a safety cap (anneal_to_budget=False): a slow, loaded machine must train the same
    # model, so the lr follows the steps alone. The backbone stage anneals to its time budget instead.
    def slow_batch(step):
        time.sleep(0.05)
        return {"x": torch.ones(3)}

    log = _LrLog()
    res = mt.train_loop(_Quadratic(), slow_batch, steps=20, lr=1.0, time_budget_s=0.4, warmup_steps=0,
                        logger=log, log_every=1, anneal_to_budget=anneal)
    assert 3 <= res.steps < 20  # the cap stopped both
    by_steps = {s: lr_multiplier(s - 1, warmup_steps=0, total_steps=20, schedule="linear") for s in log.lr}
    if anneal:
        assert log.lr[res.steps] < by_steps[res.steps] - 0.2
    else:
        assert log.lr == pytest.approx(by_steps)


def test_lora_or_full_is_required(backbone, suite, tmp_path):
    with pytest.raises(ConfigError, match="lora"):
        mt.train_multitask(backbone, suite.train, tmp_path / "x", lora=None, full=False, steps=1, device="cpu")
    assert not (tmp_path / "x").exists()
