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
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.backbone_recipe import ASSET_DIR
from tagi_ds.run.prompts import prompt_ids, prompt_settings
from tagi_ds.run.units import load_run_units
from tagi_ds.train import baselines
from tagi_ds.train.loop import train_loop
from tagi_ds.train.schedule import lr_multiplier

SETS = ["device=cpu", "seed=0", "distributed.use_deepspeed=false", "data.source=synthetic", "data.max_tasks=2", "data.synthetic.instances_per_task=30",
        "data.synthetic.held_back_per_task=4", "data.max_source_length=256", "data.max_input_length=32",
        "data.max_target_length=12", "data.max_eval_instances_per_task=3", "lora.r=8", "lora.alpha=16",
        "backbone.target_modules=[q, k, v, o, ffn_in, ffn_out]", "baselines.steps=30", "baselines.lr=0.005",
        "baselines.tasks_per_batch=2", "baselines.instances_per_task=4", "baselines.warmup_steps=3",
        "baselines.log_every=1", "baselines.checkpoint_every=0", "eval.max_new_tokens=4", "eval.batch_size=16",
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
    first, last = sum(stats["losses"][:5]) / 5, sum(stats["losses"][-5:]) / 5
    assert stats["steps"] == 30 and len(stats["losses"]) == 30 and last < first - 0.3, stats
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "stage.json").is_file()
    from tagi_ds.eval.costs import training_curves  # the report's curve is the logged one, step by step
    curve = training_curves(RunPaths.of(cfg), [])["baseline no_instruction loss"]
    assert [s for s, _ in curve] == list(range(1, 31)) and [v for _, v in curve] == stats["losses"]
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


def test_a_zero3_stage_leaves_no_partitioning_behind_for_the_next_stage(run):
    """A ZeRO-3 baseline in this process, then the evaluation's model load: whole weights, not size-0 partitions
    (the registered ZeRO-3 config used to outlive its stage)."""
    cfg = run("distributed.use_deepspeed=true", "distributed.param_persistence_threshold=0", "baselines.steps=2",
              "name=z3")
    [folder] = baselines.run(cfg, "no_instruction", progress=False)
    from tagi_ds.run.backbone import load_model_folder

    model, _ = load_model_folder(folder, "cpu")
    assert all(p.numel() > 0 for p in model.parameters())
    model.merge_and_unload()


def test_a_llama_tokenizer_without_a_pad_token_trains_a_baseline_and_generates(tmp_path):
    """Llama-2 has no pad token: batches pad with eos (masked), generation too. Before, `collate(items,
    tok.pad_token_id)` called torch.full(..., None) and raised TypeError."""
    from tests.tiny import nopad_llama_dir

    bb = nopad_llama_dir(tmp_path / "nopad")
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=np", f"backbone.name_or_path={bb}",
                             "backbone.target_modules=[q, v]", *SETS, "baselines.steps=3", "data.max_source_length=64"])
    [folder] = baselines.run(cfg, "tk_instruct", progress=False)
    assert json.loads((folder / "train.json").read_text())["steps"] == 3
    backbone = load_run_backbone(cfg)
    assert backbone.tokenizer.pad_token_id is None
    tasks = {"seen": [t.with_instances(t.instances[:3]) for ts in load_run_units(cfg).tasks.values() for t in ts]}
    preds = predict_baseline(cfg, "tk_instruct", tasks, backbone, log=print).by_split["seen"]
    assert len(preds) == 6 and all(isinstance(p, str) for p in preds)


def _saved_activation_bytes(module, batch) -> int:
    """Bytes autograd saves for backward in one forward (the activation memory a step holds)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(batch)[0].backward()
    return total[0]


def test_a_t5_baseline_in_bf16_with_checkpointing_saves_3x_activation_memory(tmp_path):
    """The baselines run on the engine with the backbone's dtype and activation checkpointing: measured on a T5
    (6+6 layers, d 64) on the same batch, bf16 + checkpointing saves >= 3x fewer activation bytes than fp32 without."""
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.train.engine_stage import EngineSetup
    from tests.tiny import backbone_dir

    bb = backbone_dir(tmp_path / "t5", "t5", hidden=64, ffn=128, vocab=400, suite_size=(6, 1))
    from transformers import T5ForConditionalGeneration
    m = T5ForConditionalGeneration.from_pretrained(bb)
    m.config.num_layers = m.config.num_decoder_layers = 6
    T5ForConditionalGeneration(m.config).save_pretrained(bb)
    batch = baselines.BaselineBatch(torch.randint(3, 300, (8, 96)), torch.ones(8, 96, dtype=torch.long),
                                    torch.randint(3, 300, (8, 24)))
    saved = {}
    for dtype, ckpt in (("float32", False), ("bfloat16", True)):
        run_cfg = load_config(None, [f"runs_dir={tmp_path}", f"backbone.name_or_path={bb}", *SETS,
                                     f"backbone.dtype={dtype}", f"backbone.gradient_checkpointing={str(ckpt).lower()}"])
        backbone, _ = load_backbone(str(bb), "t5", dtype)
        setup = EngineSetup(run_cfg, torch.device("cpu"), None, str(bb), "t5", backbone, None)
        step = baselines.LoraStep(baselines.lora_model(setup, run_cfg), "t5")
        step.train()
        saved[(dtype, ckpt)] = _saved_activation_bytes(step, batch)
    ratio = saved[("float32", False)] / saved[("bfloat16", True)]
    print(f"T5 baseline saved activations: fp32 {saved[('float32', False)] / 2**20:.1f} MiB, bf16 + checkpointing "
          f"{saved[('bfloat16', True)] / 2**20:.1f} MiB: {ratio:.1f}x")
    assert ratio >= 3.0
