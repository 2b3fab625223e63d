"""Run configs shared by the teacher / cache-logits tests (the backbone folder comes from tests/train/conftest.py)."""
from __future__ import annotations

from pathlib import Path

from tagi_ds.config import load_config

# Small enough for 2 shared CPU cores, big enough that a LoRA teacher visibly learns its task.
DATA = ["data.source=synthetic", "data.synthetic.instances_per_task=40", "data.synthetic.held_back_per_task=8",
        "data.max_tasks=3", "data.max_source_length=256", "data.max_input_length=32", "data.max_target_length=16"]
TEACHER = ["lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "teacher.steps=30", "teacher.lr=0.01",
           "teacher.batch_size=8", "teacher.tasks_per_batch=3", "teacher.warmup_steps=3",
           "teacher.checkpoint_every=10", "cache.top_k=8", "cache.batch_size=16", "eval.max_new_tokens=8",
           "eval.batch_size=32"]


def run_cfg(runs_dir: Path, backbone_dir: Path, arch: str, *extra: str, name: str = "t"):
    return load_config(None, [f"runs_dir={runs_dir}", f"name={name}", "device=cpu", "seed=0",
                              f"backbone.name_or_path={backbone_dir}", f"backbone.arch={arch}",
                              "backbone.target_modules=[q, v]", *DATA, *TEACHER, *extra])


def cli_overrides(backbone_dir: Path, arch: str, runs_dir: Path, *extra: str, name: str = "t") -> list[str]:
    """The same config as `run_cfg`, as `key=value` words for a `tagi-ds` subprocess."""
    return [f"runs_dir={runs_dir}", f"name={name}", "device=cpu", "seed=0", "threads=1",
            f"backbone.name_or_path={backbone_dir}", f"backbone.arch={arch}", "backbone.target_modules=[q, v]",
            *DATA, *TEACHER, *extra]
