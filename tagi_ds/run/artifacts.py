"""What a published teacher and a logit-cache shard must hold for a run: their manifests, written by the teacher and
cache-logits stages and checked, with the same functions, by every stage that reads them (cache-logits, finetune,
evaluate). A folder of another configuration is refused naming both hashes, never silently reused.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

from ..data.collate import PromptSettings
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..io_utils import atomic_write_json, sha256_file, sha256_json
from .identity import config_identity, task_data
from .peft_io import ADAPTER_WEIGHTS
from .prompts import num_demonstrations
from .units import unit_seed

TEACHER_KIND = "tagi-ds/teacher"
TEACHER_VERSION = 2  # 2: the config part is the teacher stage's identity (run/identity.py)
PROMPT_FORMAT = "tk-instruct-v1"


def instances_fingerprint(tasks: Sequence[Task]) -> str:
    """sha256 over (task, instance id, label, input) of every instance: which data a teacher / shard saw."""
    return sha256_json([[t.name, [[i.id, i.label, i.input] for i in t.instances]] for t in tasks])


def teacher_config(cfg) -> dict[str, Any]:
    """The config a teacher's weights depend on (not the task data: that is fingerprinted per unit)."""
    d = cfg.data
    return {"backbone_id": config_identity(cfg, ())["backbone_id"], "backbone_dtype": cfg.backbone.dtype,
            "group_by": cfg.teacher.group_by,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                     "target_modules": list(cfg.backbone.target_modules)},
            "prompt": {"format": PROMPT_FORMAT, "num_pos": num_demonstrations(d),
                       "add_definition": d.add_task_definition, "max_source_length": d.max_source_length,
                       "max_target_length": d.max_target_length},
            "train": {"steps": cfg.teacher.steps, "lr": cfg.teacher.lr, "batch_size": cfg.teacher.batch_size,
                      "warmup_steps": cfg.teacher.warmup_steps, "grad_clip": cfg.teacher.grad_clip},
            "seed": cfg.seed}


def teachers_identity(cfg) -> dict[str, Any]:
    """What the teacher stage as a whole depends on: the teachers' config part and the task data (each published
    unit also records its own data fingerprint, so a changed task is never reused)."""
    return {"teacher": teacher_config(cfg), "data": task_data(config_identity(cfg, ("data",)))["data"]}


def teacher_manifest(cfg, unit: str, tasks: Sequence[Task], arch: str, tokenizer_hash: str) -> dict:
    """What makes a teacher this teacher; `hash` covers every other field."""
    body = {"kind": TEACHER_KIND, "version": TEACHER_VERSION, "unit": unit, "arch": arch,
            "tokenizer_hash": tokenizer_hash, "config": teacher_config(cfg),
            "data": {"tasks": [t.name for t in tasks], "instances": sum(len(t.instances) for t in tasks),
                     "instances_sha256": instances_fingerprint(tasks)},
            "seed": unit_seed(cfg.seed, unit)}
    return {**body, "hash": sha256_json(body)}


def published_state(teacher_dir: Path, want_hash: str) -> str:
    """'missing', 'done' (same hash) — or raise ArtifactMismatchError for a folder of another configuration."""
    if not teacher_dir.exists():
        return "missing"
    mpath = teacher_dir / "manifest.json"
    try:
        have = json.loads(mpath.read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        have = None
    if have == want_hash:
        return "done"
    raise ArtifactMismatchError(
        f"{teacher_dir}: an existing teacher was trained for another configuration (manifest hash {have!r} in "
        f"{mpath}; this run expects {want_hash!r}); remove that folder to retrain it, or use another run name")


def check_temperatures(cache_temperature: float, finetune_temperature: float) -> None:
    """The KL is computed at the temperature the cache was written at: the two must agree."""
    if float(cache_temperature) != float(finetune_temperature):
        raise ConfigError(f"cache.temperature={cache_temperature} must equal finetune.temperature="
                          f"{finetune_temperature}: the cached top-k was taken at the cache's temperature")


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, computed once per process for a given (path, size, mtime): a finetune reads each
    teacher's hash for its shard check once, not once at start-up and again in epoch 1."""
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


# Beside its manifest, a shard keeps the size and mtime of the teacher weights it was made from (a hidden file, not
# part of the shard's content: two equal runs write different mtimes, and a copy to another filesystem changes it).
# When the stat still matches, the finetune's start-up trusts it and the full hash is checked when the shard is first
# read; when it differs or is missing, the start-up hashes the weights at once, so a retrained teacher is refused
# before anything is written.
TEACHER_STAT_FILE = ".teacher_stat.json"


def _weights_stat(path: Path) -> list[int]:
    st = Path(path).stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def record_teacher_stat(shard: Path, weights: Path) -> None:
    atomic_write_json(Path(shard) / TEACHER_STAT_FILE, _weights_stat(weights))


def teacher_stat_matches(shard: Path, weights: Path) -> bool:
    try:
        return json.loads((Path(shard) / TEACHER_STAT_FILE).read_text()) == _weights_stat(weights)
    except (OSError, ValueError):
        return False


def shard_fields(cfg, task: Task, *, arch: str, tokenizer_hash: str, backbone_id: str, teacher_dir: Path,
                 vocab_size: int, settings: PromptSettings, with_teacher_hash: bool = True) -> dict[str, Any]:
    """The manifest fields one task's shard must carry for this run (the cache stage writes them, the finetune
    passes them as a reader's `expect`). `with_teacher_hash=False` leaves out the teacher weights' hash: a cheap
    check of everything else (a finetune's start-up), the full one when the shard is first read."""
    from ..distill.logit_cache import manifest_fields
    from ..distill.teacher_rows import CacheMode

    c = cfg.cache
    mode = CacheMode.of_config(c.mode, top_k=c.top_k, num_samples=c.num_samples, seed=cfg.seed, vocab_size=vocab_size)
    fields = manifest_fields(
        tokenizer_hash=tokenizer_hash, backbone_id=backbone_id,
        teacher_adapter_hash="(deferred)", mode=mode, temperature=c.temperature,
        prompt_format=f"{PROMPT_FORMAT}:{arch}:pos{settings.num_pos}:def{int(settings.add_definition)}",
        max_source_length=settings.max_source_length, max_target_length=settings.max_target_length,
        vocab_size=vocab_size)
    fields = {**fields, "instances_sha256": instances_fingerprint([task])}
    if with_teacher_hash:
        fields["teacher_adapter_hash"] = weights_sha256(Path(teacher_dir) / ADAPTER_WEIGHTS)
    else:
        fields.pop("teacher_adapter_hash")
    return fields
