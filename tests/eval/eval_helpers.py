"""A finished micro run for the evaluation tests (built once per module by the pipeline, whose evaluate stage is the
1-process reference), copies of it to evaluate again, and the launched worker that stalls after N shard files.

Worker: `python -m tests.eval.eval_helpers --stall-after N --pid-file P -- <tagi-ds evaluate args>` runs the real CLI
with `write_shard` wrapped: after the N-th published shard file it writes its pid and sleeps until killed.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MICRO = """\
name: micro
seed: 0
device: cpu
threads: 1
data:
  source: synthetic
  max_tasks: 2
  max_eval_instances_per_task: 2
  max_source_length: 160
  max_input_length: 24
  max_target_length: 12
  pretrain_text: offline
  pretrain_offline_docs: 20
  pretrain_segment_lengths: [16, 8, 8]
  synthetic: {instances_per_task: 12, held_back_per_task: 2}
backbone: {arch: llama, target_modules: [q, v]}
lora: {r: 2, alpha: 4.0}
hypernet: {hidden: 16, trunk_layers: 1, embed_dim: 8, kernel: reference}
teacher: {group_by: task, steps: 2, batch_size: 4, tasks_per_batch: 8, warmup_steps: 1, checkpoint_every: 0}
cache: {top_k: 8, temperature: 2.0, batch_size: 16}
pretrain: {steps: 2, micro_batch_size: 4, warmup_steps: 1, checkpoint_every: 0, log_every: 1}
finetune: {steps: 3, lr: 0.01, tasks_per_batch: 2, instances_per_task: 2, warmup_steps: 1, checkpoint_every: 0,
           log_every: 1, temperature: 2.0, lambda_ins: 0.5}
distributed: {use_deepspeed: false, timeout_s: 120}
eval: {methods: [no_ft, tk_instruct, teacher, tagi], max_new_tokens: 4, batch_size: 3, tasks_per_batch: 1}
baselines: {steps: 3, tasks_per_batch: 2, instances_per_task: 2, lr: 0.01}
"""


@dataclass
class MicroRun:
    root: Path
    yaml: Path
    sets: list[str]       # runs_dir, backbone path
    run_dir: Path

    def cfg(self, *extra: str, name: str = "micro"):
        from tagi_ds.config import load_config

        return load_config(self.yaml, [*self.sets, f"name={name}", *extra])

    def args(self, *extra: str, name: str = "micro") -> list[str]:
        return ["--config", str(self.yaml), *self.sets, f"name={name}", *extra]

    def copy(self, name: str) -> Path:
        """The finished stages of the run under another name, without its evaluation."""
        dest = self.run_dir.parent / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.run_dir, dest, ignore=shutil.ignore_patterns("eval", "report.*", "*.png", ".pipeline"))
        return dest


def build_micro_run(root: Path) -> MicroRun:
    """Backbone (wide init, so greedy answers depend on the input), teachers, cache, pretrain, finetune (tagi),
    the tk_instruct baseline, and the 1-process evaluation: the pipeline, in this process."""
    from tests.tiny import backbone_dir

    from tagi_ds.config import load_config
    from tagi_ds.pipeline import run as pipeline

    bb = backbone_dir(root / "bb", hidden=32, ffn=64, vocab=400, suite_size=(10, 2), wide_init=True)
    yaml = root / "micro.yaml"
    yaml.write_text(MICRO)
    sets = [f"runs_dir={root / 'runs'}", f"backbone.name_or_path={bb}"]
    pipeline(load_config(yaml, sets), progress=False, log=lambda _m: None)
    return MicroRun(root, yaml, sets, root / "runs" / "micro")


def snapshot(root: Path) -> dict[str, int]:
    """mtime_ns of every file under `root` (relative path → mtime)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def predictions(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted((run_dir / "eval" / "predictions").rglob("*"))
            if p.is_file()}


def metrics_numbers(run_dir: Path) -> dict:
    """metrics.json without what depends on timing."""
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {k: m[k] for k in ("methods", "echo", "demo_output", "rank_classification", "seen_from", "flops")}


def _stalling_worker(argv: list[str]) -> int:
    import os

    import tagi_ds.eval.evaluate as E
    from tagi_ds.cli import main

    i = argv.index("--")
    opts, cli_args = argv[:i], argv[i + 1:]
    stall_after = int(opts[opts.index("--stall-after") + 1])
    pid_file = Path(opts[opts.index("--pid-file") + 1])
    publish, written = E.write_shard, []

    def stalling(*args, **kwargs):
        publish(*args, **kwargs)
        written.append(args[0])
        if len(written) == stall_after:  # mid-way: some shard files of this shard published, the rest not
            pid_file.write_text(str(os.getpid()))
            while True:
                time.sleep(1)

    E.write_shard = stalling
    return main(["evaluate", *cli_args])


if __name__ == "__main__":
    sys.exit(_stalling_worker(sys.argv[1:]))
