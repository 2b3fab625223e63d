"""What a published teacher and a logit-cache shard must hold for a run: their manifests, written by the teacher and
cache-logits stages and checked, with the same functions, by every stage that reads them (cache-logits, finetune,
evaluate). A folder of another configuration is refused naming both hashes, never silently reused.

A teacher's manifest also records the sha256 of its weights (`weights_sha256`, outside the identity `hash`): a
teacher whose weights no longer match (truncated, zeroed, replaced) is retrained by the teacher stage and refused,
naming the file, by every stage that reads it. A cache shard of this very configuration whose data is damaged, or
whose teacher was retrained, is rebuilt; one of another configuration is refused.
"""
from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from ..data.collate import PromptSettings
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..io_utils import atomic_write_json, sha256_bytes, sha256_file, sha256_json
from .identity import config_identity, task_data
from .peft_io import ADAPTER_WEIGHTS, adapters_to_state_dict
from .prompts import num_demonstrations
from .units import unit_seed

WEIGHTS_KEY = "weights_sha256"  # manifest field: {file name: sha256} of the published weights
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


def with_weights_hash(manifest: dict, specs: Sequence, adapters: dict) -> dict:
    """`manifest` plus the sha256 of the adapter file `peft_io.write_peft_adapter` will write for `adapters`: the
    same bytes, serialized here in memory, so the manifest is published in the same atomic step as the weights."""
    from safetensors.torch import save

    data = save(adapters_to_state_dict(specs, adapters), metadata={"format": "pt"})
    return {**manifest, WEIGHTS_KEY: {ADAPTER_WEIGHTS: sha256_bytes(data)}}


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file's framing (None when its size matches its header): catches a truncated
    or extended file without reading the tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return f"{path}: header length {n} exceeds the file's {size} bytes (truncated or not safetensors)"
            header = json.loads(fh.read(n))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        return f"{path}: unreadable safetensors file ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"{path}: {size} bytes, its header says {8 + n + end} (truncated or overwritten)"
    return None


def weights_problem(teacher_dir: Path, manifest: dict) -> Optional[str]:
    """What is wrong with a published teacher's weights (None when they are what its manifest recorded)."""
    path = Path(teacher_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        return f"{path}: missing"
    want = (manifest.get(WEIGHTS_KEY) or {}).get(ADAPTER_WEIGHTS) if isinstance(manifest, dict) else None
    if want is None:  # written before manifests recorded the weights: check the framing at least
        return safetensors_problem(path)
    have = weights_sha256(path)
    if have != want:
        return (f"{path}: sha256 {have[:16]}… differs from the {want[:16]}… recorded in "
                f"{Path(teacher_dir) / 'manifest.json'} (damaged or replaced)")
    return None


def published_state(teacher_dir: Path, want_hash: str, *, damaged: Literal["refuse", "rebuild"] = "refuse",
                    log: Callable[[str], None] = print) -> str:
    """'missing', 'done' (same hash, weights intact), 'damaged' (same hash, weights not what the manifest recorded;
    only with damaged="rebuild": the teacher stage retrains it) — or raise ArtifactMismatchError for a folder of
    another configuration, or (damaged="refuse", every reader) for damaged weights, naming the file."""
    if not teacher_dir.exists():
        return "missing"
    mpath = teacher_dir / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        have = manifest.get("hash")
    except (OSError, ValueError, AttributeError):
        manifest, have = {}, None
    if have != want_hash:
        raise ArtifactMismatchError(
            f"{teacher_dir}: an existing teacher was trained for another configuration (manifest hash {have!r} in "
            f"{mpath}; this run expects {want_hash!r}); it is kept: use another run name, or redo the teachers and every "
            f"later stage with `pipeline --from teacher` (or remove that folder)")
    problem = weights_problem(teacher_dir, manifest)
    if problem is None:
        return "done"
    if damaged == "rebuild":
        log(f"teacher {teacher_dir.name}: {problem}; retraining it")
        return "damaged"
    raise ArtifactMismatchError(f"{problem}; rerun `tagi-ds teacher` with the same config to retrain it")


def check_shard_to_rebuild(shard: Path, fields: dict, log: Callable[[str], None] = print) -> None:
    """An existing shard that is not complete for `fields`: return (after saying why) when it may be rebuilt, i.e. it
    is damaged, or it was made for this configuration from an earlier version of its teacher's weights; raise
    ArtifactMismatchError naming the differing field when it belongs to another configuration (kept, never lost)."""
    from ..distill.logit_cache import FORMAT, MANIFEST_FILE, CacheShardReader, check_expect

    mpath = Path(shard) / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        manifest, ours = None, False
    if ours:
        check_expect({"mode": "topk", **manifest}, {k: v for k, v in fields.items() if k != "teacher_adapter_hash"},
                     str(mpath))  # raises for another configuration
    why = "its manifest is missing or unreadable"
    if ours:
        try:
            CacheShardReader(shard, fields, verify=True)
            return  # intact after all (a concurrent writer finished it): the stage skips or rewrites the same bytes
        except ArtifactMismatchError as e:
            why = ("it was made from an earlier version of its teacher's weights" if "teacher_adapter_hash" in str(e)
                   else str(e).split("; rebuild the cache")[0])
    log(f"cache-logits: {shard}: {why}; rebuilding it")


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
