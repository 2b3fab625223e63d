"""One place for the layout of a run folder: no other module spells a path under a run.

    <runs_dir>/<name>/
      config.yaml               the resolved config of the last pipeline run
      backbone/                 tiny backbone (stage `backbone`, when backbone.name_or_path is auto)
      teachers/<unit>/          PEFT adapter dir of one teacher (adapter_config.json, adapter_model.safetensors,
                                metrics.json, manifest.json), unit = task or category (teacher.group_by)
      teachers/.ckpt/<key>/     resumable checkpoints of teacher training in progress (removed once published)
      logit_cache/<task>/       teacher top-k log-probs of one task (distill.logit_cache shard)
      pretrain/                 stage 1: checkpoints/, export/, metrics.jsonl, summary.json, stage.json
      finetune/<variant>/       stage 2 per variant (tagi, hint, ablations): the same files
      baselines/<mode>/         multitask LoRA baselines (tk_instruct, no_instruction): PEFT dir + train.json
      eval/                     predictions/<method>/<split>.jsonl, metrics.json
      eval_archive/<hash>/      reports of earlier configurations of this run (the pipeline versions, never overwrites)
      report.md report.json *.png
      tb/<stage>[/<sub>]/       TensorBoard scalars of each stage
      .pipeline/<stage>.json    the pipeline's done-markers

Cache shards are keyed by *task* (the name the finetune looks up), teachers by *unit*: with teacher.group_by=task
the two coincide; with group_by=category each task's shard is written by its category's teacher.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

CKPT_DIRNAME = ".ckpt"
EXPORT_SUBDIR = "export"  # a hypernetwork stage's inference export (run/export_io.py)


def check_unit_name(name: str) -> str:
    """A unit/task/variant name usable as one folder name (no separators, not hidden); DataError otherwise."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise DataError(f"name {name!r} cannot be used as a folder name under the run folder "
                        "(empty, hidden, or contains a path separator)")
    return name


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @classmethod
    def of(cls, cfg) -> "RunPaths":
        """The paths of a RunConfig's run (<runs_dir>/<name>)."""
        return cls(Path(cfg.run_dir))

    # ------------------------------------------------------------------------------------------- stages
    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def backbone(self) -> Path:
        return self.run_dir / "backbone"

    @property
    def teachers(self) -> Path:
        return self.run_dir / "teachers"

    def teacher(self, unit: str) -> Path:
        return self.teachers / check_unit_name(unit)

    @property
    def teacher_ckpt_root(self) -> Path:
        return self.teachers / CKPT_DIRNAME

    def teacher_ckpt(self, units: list[str]) -> Path:
        """Checkpoint folder of one batch of teachers; one unit keeps its own name, a batch gets a stable hash."""
        if len(units) == 1:
            return self.teacher_ckpt_root / check_unit_name(units[0])
        key = hashlib.sha256("\n".join(units).encode()).hexdigest()[:16]
        return self.teacher_ckpt_root / f"batch-{key}"

    @property
    def logit_cache(self) -> Path:
        return self.run_dir / "logit_cache"

    def cache_shard(self, task: str) -> Path:
        return self.logit_cache / check_unit_name(task)

    @property
    def pretrain(self) -> Path:
        return self.run_dir / "pretrain"

    def finetune(self, variant: str) -> Path:
        return self.run_dir / "finetune" / check_unit_name(variant)

    @property
    def finetune_root(self) -> Path:
        return self.run_dir / "finetune"

    def export(self, stage_dir: Path) -> Path:
        """A hypernetwork stage folder's inference export."""
        return Path(stage_dir) / EXPORT_SUBDIR

    @property
    def pretrain_export(self) -> Path:
        return self.export(self.pretrain)

    def finetune_export(self, variant: str) -> Path:
        return self.export(self.finetune(variant))

    @property
    def baselines_root(self) -> Path:
        return self.run_dir / "baselines"

    def baseline(self, mode: str) -> Path:
        return self.baselines_root / check_unit_name(mode)

    @property
    def eval(self) -> Path:
        return self.run_dir / "eval"

    def predictions(self, method: str, split: str) -> Path:
        return self.eval / "predictions" / check_unit_name(method) / f"{check_unit_name(split)}.jsonl"

    def eval_archive(self, identity_hash: str) -> Path:
        """Where the pipeline moves a report of another configuration before evaluating this one."""
        return self.run_dir / "eval_archive" / identity_hash[:16]

    @property
    def eval_metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def tb_root(self) -> Path:
        return self.run_dir / "tb"

    def tb(self, stage: str) -> Path:
        """TensorBoard folder of a stage ("teacher", "pretrain", "finetune/tagi", "baseline_tk_instruct")."""
        return self.tb_root / stage

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    @property
    def report_json(self) -> Path:
        return self.run_dir / "report.json"

    @property
    def markers(self) -> Path:
        return self.run_dir / ".pipeline"

    @property
    def pipeline_record(self) -> Path:
        return self.run_dir / "pipeline.json"

    def published_teachers(self) -> list[str]:
        """Units with a published adapter (hidden temp/checkpoint folders excluded), sorted."""
        if not self.teachers.is_dir():
            return []
        return sorted(p.name for p in self.teachers.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file())
