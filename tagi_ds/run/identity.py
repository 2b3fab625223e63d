"""What a stage's outputs depend on, written once: every stage module's `identity(cfg, sub)` builds its dict from
here; the pipeline's done-markers hash it, and the stage records it next to its outputs (`stage.json`, or the
per-unit manifests of teachers and cache shards) so a rerun with another configuration is refused, never mixed in.

A stage's identity is the resolved config of the sections it reads, minus keys that only change how a run executes
or logs (`RUNTIME_KEYS`), plus the identity of the backbone it resolves to (a tiny backbone's recipe hash).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import to_dict
from ..errors import ArtifactMismatchError
from ..io_utils import atomic_write_json, sha256_json
from .backbone import run_backbone_identity

STAGE_RECORD = "stage.json"
# Keys that change how a run executes or logs, never the weights or numbers it publishes: they may differ between a
# run and its rerun / resume. Section "" = top level.
RUNTIME_KEYS: dict[str, set[str]] = {
    "": {"name", "runs_dir", "threads", "device", "distributed", "stage_budgets_s"},
    # grad_accum: how a global batch is laid out over ranks x accumulation (a resume on other ranks keeps it whole)
    "pretrain": {"enabled", "time_budget_s", "checkpoint_every", "keep_checkpoints", "resume", "log_every",
                 "grad_accum"},
    "finetune": {"enabled", "time_budget_s", "checkpoint_every", "keep_checkpoints", "resume", "log_every",
                 "grad_accum", "teacher_cache_gib", "encoding_cache_mib"},  # memory knobs: same numbers
    "baselines": {"enabled", "time_budget_s", "checkpoint_every", "keep_checkpoints", "resume", "log_every",
                  "grad_accum"},
    "teacher": {"time_budget_s", "checkpoint_every", "resume", "array_concurrency", "units_per_job", "write_cache"},
    "cache": {"batch_size"},
    "backbone": {"gradient_checkpointing", "attn_implementation"},
    "hypernet": {"kernel"},
    "data": {"max_eval_instances_per_task"},
    "eval": {"batch_size", "rank_batch_size", "tasks_per_batch", "teacher_group_bytes"},
}
# The data keys only stage 1 reads (plain text); every other stage reads the task keys (all the others).
PRETRAIN_DATA_KEYS = ("pretrain_text", "pretrain_segment_lengths", "pretrain_offline_docs", "pretrain_offline_corpus")


def config_identity(cfg, sections: Sequence[str]) -> dict[str, Any]:
    """The resolved config of `sections` (top-level keys such as "seed" allowed) minus runtime-only keys, plus the
    backbone's identity."""
    full = to_dict(cfg)
    out: dict[str, Any] = {}
    for sec in sections:
        value = full[sec]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in RUNTIME_KEYS.get(sec, set())}
        out[sec] = value
    out["backbone_id"] = run_backbone_identity(cfg)
    return out


def task_data(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` with the data section reduced to the task keys (the instruction-task stages)."""
    if "data" in identity:
        identity["data"] = {k: v for k, v in identity["data"].items() if k not in PRETRAIN_DATA_KEYS}
    return identity


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def describe_difference(have: dict, want: dict, limit: int = 6) -> str:
    """'key: old -> new; …' over the flattened dicts (what a refusal message shows)."""
    a, b = _flat(have), _flat(want)
    diff = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return "; ".join(diff[:limit]) + (" …" if len(diff) > limit else "")


def check_stage_record(out_dir: Path, stage: str, identity: dict[str, Any]) -> Optional[dict]:
    """Refuse (ArtifactMismatchError naming both hashes and the differing keys) when `out_dir` holds outputs of
    another configuration; return the record to write (None when the folder already holds this one)."""
    want = sha256_json(identity)
    path = Path(out_dir) / STAGE_RECORD
    if not path.is_file():
        return {"stage": stage, "hash": want, "identity": identity}
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
        have_hash, have_ident = have["hash"], have["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactMismatchError(f"{path}: unreadable stage record ({e}); remove {out_dir} to start over") from None
    if have_hash == want:
        return None
    raise ArtifactMismatchError(
        f"{out_dir}: holds the {stage} outputs of another configuration (hash {have_hash[:16]} in {path}; this run is "
        f"{want[:16]}); differing keys: {describe_difference(have_ident, identity)}. Its outputs are kept: use "
        f"another run name (or finetune variant=NAME), or remove that folder (pipeline --from {stage}) to redo it")


def write_stage_record(out_dir: Path, record: Optional[dict]) -> None:
    if record is not None:
        atomic_write_json(Path(out_dir) / STAGE_RECORD, record)


def stage_record_hash(out_dir: Path) -> Optional[str]:
    """The identity hash a finished stage folder records (None when absent or unreadable)."""
    try:
        return json.loads((Path(out_dir) / STAGE_RECORD).read_text(encoding="utf-8"))["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def identity_hash(identity: dict[str, Any]) -> str:
    return sha256_json(identity)
