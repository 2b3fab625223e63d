"""The multitask baselines as a training stage: the teachers' prompt encoding, answer-only loss, a loss that falls, a
published PEFT folder the evaluation reads, skip / refuse by identity; and the flat loop's time cap."""
from __future__ import annotations

import json
import time
import types

import pytest
import torch

from tagi_ds.config import load_config
from tagi_ds.data.collate import IGNORE, assemble
from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.eval.methods import predict_baseline
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.backbone_recipe import ASSET_DIR
from tagi_ds.run.prompts import prompt_ids, prompt_settings
from tagi_ds.run.units import load_run_units
from tagi_ds.train import baselines
from tagi_ds.train.loop import train_loop
from tagi_ds.train.schedule import lr_multiplier

SETS = ["device=cpu", "seed=0", "data.source=synthetic", "data.max_tasks=2", "data.synthetic.instances_per_task=30",
        "data.synthetic.held_back_per_task=4", "data.max_source_length=256", "data.max_input_length=32",
        "data.max_target_length=12", "data.max_eval_instances_per_task=3", "lora.r=8", "lora.alpha=16",
        "backbone.target_modules=[q, k, v, o, ffn_in, ffn_out]", "baselines.steps=30", "baselines.lr=0.005",
        "baselines.batch_size=8", "baselines.warmup_steps=3", "eval.max_new_tokens=4", "eval.batch_size=16",
        "eval.methods=[tk_instruct, no_instruction]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs on the committed tiny backbone: it copies words, so a baseline's loss visibly falls in 30 steps (a
    random backbone's barely moves)."""
    root = tmp_path_factory.mktemp("baselines")
    return lambda *extra: load_config(None, [f"runs_dir={root / 'runs'}", "name=b",
                                             f"backbone.name_or_path={ASSET_DIR}", *SETS, *extra])


def test_baseline_prompts_are_the_teachers_and_the_frozen_backbones(run):
    """One encoder and one truncation rule: a prompt longer than data.max_source_length is cut the same way for
    the baselines, the teachers and no_ft (the start kept, as Tk-Instruct's collator does). Before, the baselines
    kept the prompt's END (another encoder), so they read another prompt than every other method."""
    cfg = run("data.max_source_length=20")
    bb = load_run_backbone(cfg)
    settings = prompt_settings(cfg, bb.arch)
    task = load_run_units(cfg).tasks[load_run_units(cfg).units[0]][0].with_instances(
        load_run_units(cfg).tasks[load_run_units(cfg).units[0]][0].instances[:4])
    full = baselines.baseline_examples(task, bb.tokenizer, settings, "tk_instruct")
    frozen = prompt_ids([task], bb.tokenizer, settings)  # what no_ft and the teachers decode from
    assert [list(e.prompt) for e in full] == frozen
    assert all(len(p) == 20 for p in frozen)  # the prompts really were too long
    start = bb.tokenizer("Definition:", add_special_tokens=False)["input_ids"][:2]
    assert all(p[1:3] == start for p in frozen)  # the start survives (bos, then "Definition:")
    bare = baselines.baseline_examples(task, bb.tokenizer, settings, "no_instruction")
    assert [list(e.prompt) for e in bare] == prompt_ids([task], bb.tokenizer, settings, with_instruction=False)
    batch = assemble(full, bb.arch, 0)  # the loss sits on the answer (+ eos) only
    for row, e in zip(batch["labels"], full):
        kept = row[row != IGNORE].tolist()
        assert kept == list(e.target) and kept[-1] == bb.tokenizer.eos_token_id
    with pytest.raises(ConfigError, match="hint"):
        baselines.baseline_examples(task, bb.tokenizer, settings, "hint")


def test_a_baseline_trains_publishes_and_is_read_by_the_evaluation(run):
    cfg = run()
    [folder] = baselines.run(cfg, "no_instruction", progress=False)  # short prompts: a cheap test
    stats = json.loads((folder / "train.json").read_text())
    assert stats["steps"] == 30 and stats["loss_last10"] < stats["loss_first10"] - 0.3, stats
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "stage.json").is_file()
    mtime = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    baselines.run(cfg, "no_instruction", progress=False)  # same identity: skipped, nothing rewritten
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ArtifactMismatchError, match="baselines.lr"):
        baselines.run(run("baselines.lr=0.5"), "no_instruction", progress=False)
    bb = load_run_backbone(cfg)
    tasks = {"seen": [t.with_instances(t.instances[:3]) for ts in load_run_units(cfg).tasks.values() for t in ts]}
    mp = predict_baseline(cfg, "no_instruction", tasks, bb, log=print)
    assert len(mp.by_split["seen"]) == 6 and all(isinstance(p, str) for p in mp.by_split["seen"])
    missing = predict_baseline(cfg, "tk_instruct", tasks, bb, log=print)
    assert missing.by_split == {"seen": None}  # not trained: no numbers, nothing trained by the evaluation


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
    res = train_loop(_Quadratic(), slow_batch, steps=20, lr=1.0, time_budget_s=0.4, warmup_steps=0,
                     logger=log, log_every=1, anneal_to_budget=anneal)
    assert 3 <= res.steps < 20  # the cap stopped both
    by_steps = {s: lr_multiplier(s - 1, warmup_steps=0, total_steps=20, schedule="linear") for s in log.lr}
    if anneal:
        assert log.lr[res.steps] < by_steps[res.steps] - 0.2
    else:
        assert log.lr == pytest.approx(by_steps)
