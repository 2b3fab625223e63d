"""Shared tiny artifacts of the reliability tests, built once per session.

`rel_run` is one tiny LLaMA run: a sentencepiece tokenizer + random backbone (tests.tiny.small_backbone_dir), random
PEFT teachers and their logit-cache shards with the manifests the finetune expects (write_teachers_and_cache), and a
plain-loop (no DeepSpeed) finetune of 2 steps with a checkpoint after each step and an export. The bad-input tests
run the real CLI against it and check that nothing under the run folder changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

CONFIG = """\
seed: 0
device: cpu
threads: 1
data:
  source: synthetic
  max_tasks: 2
  max_source_length: 96
  max_input_length: 24
  max_target_length: 8
  num_pos_examples: 1
  synthetic: {instances_per_task: 6, held_back_per_task: 2}
  pretrain_text: offline
  pretrain_offline_docs: 48
  pretrain_segment_lengths: [16, 12, 8]
lora: {r: 4, alpha: 8.0}
hypernet: {hidden: 16, trunk_layers: 1, embed_dim: 8, kernel: reference}
cache: {top_k: 8, temperature: 2.0}
teacher: {steps: 2, batch_size: 4, checkpoint_every: 1}
pretrain: {steps: 4, lr: 0.01, warmup_steps: 1, schedule: constant, micro_batch_size: 4, checkpoint_every: 2,
           log_every: 1, weight_decay: 0.0}
finetune: {steps: 2, lr: 0.003, warmup_steps: 1, tasks_per_batch: 2, instances_per_task: 3, log_every: 1,
           checkpoint_every: 1, keep_checkpoints: 3, lambda_kl: 1.0, lambda_ins: 0.5, temperature: 2.0}
distributed: {use_deepspeed: false}
"""


@dataclass
class RelRun:
    root: Path
    yaml: Path
    sets: list[str]         # key=value words that complete the YAML (runs_dir, name, backbone path)
    backbone: Path
    run_dir: Path
    export: Path            # finetune/tagi/export
    tasks: list[str]

    def args(self, *extra: str) -> list[str]:
        return ["--config", str(self.yaml), *self.sets, *extra]

    def cfg(self, *extra: str):
        from tagi_ds.config import load_config

        return load_config(self.yaml, [*self.sets, *extra])


@pytest.fixture(scope="session")
def rel_run(tmp_path_factory) -> RelRun:
    from tests.train import recipe_worker as W

    from tagi_ds.train import finetune

    root = tmp_path_factory.mktemp("reliability")
    bb = W.build_backbone("llama", root / "bb")
    yaml = root / "run.yaml"
    yaml.write_text(CONFIG)
    sets = [f"runs_dir={root / 'runs'}", "name=r", f"backbone.name_or_path={bb}"]
    from tagi_ds.config import load_config

    cfg = load_config(yaml, sets)
    tasks = W.write_teachers_and_cache(cfg)
    export = finetune.run(cfg, "tagi", progress=False)
    return RelRun(root, yaml, sets, bb, cfg.run_dir, Path(export), tasks)

