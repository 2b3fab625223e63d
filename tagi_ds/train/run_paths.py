"""One place for the layout of a run folder, so every stage reads and writes the same paths.

    <runs_dir>/<name>/
      backbone/                 tiny backbone (stage `backbone`, when backbone.name_or_path is auto)
      teachers/<unit>/          PEFT adapter dir of one teacher (adapter_config.json, adapter_model.safetensors,
                                metrics.json, manifest.json), unit = task or category (teacher.group_by)
      teachers/.ckpt/<key>/     resumable checkpoints of teacher training in progress (removed once published)
      logit_cache/<task>/       teacher top-k log-probs of one task (distill.logit_cache shard)
      pretrain/ finetune/       hypernetwork stages (checkpoints/, export/)
      eval/  report.md          evaluation
      tb/<stage>/               TensorBoard scalars of each stage

Cache shards are keyed by *task* (the name the finetune looks up), teachers by *unit*: with teacher.group_by=task
the two coincide; with group_by=category each task's shard is written by its category's teacher.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

CKPT_DIRNAME = ".ckpt"


def check_unit_name(name: str) -> str:
    """A unit/task name usable as one folder name (no separators, not hidden); DataError otherwise."""
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

    def stage_dir(self, stage: str) -> Path:
        """pretrain/, finetune/, eval/ …"""
        return self.run_dir / stage

    def tb(self, stage: str) -> Path:
        return self.run_dir / "tb" / stage

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    def published_teachers(self) -> list[str]:
        """Units with a published adapter (hidden temp/checkpoint folders excluded), sorted."""
        if not self.teachers.is_dir():
            return []
        return sorted(p.name for p in self.teachers.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file())
