"""Checks a command makes before it writes or deletes anything, so a refused run changes nothing.

- `check_model_source`: a backbone / tokenizer given as a path must be a model folder; as a hub id it must be a valid
  id, and cached when the hub is offline (transformers would answer with "Repo id must use alphanumeric chars…").
- `check_run_config`: what every stage command needs from its config before it starts (the CLI calls it).
- `check_teachers_state` / `check_cache_state`: would the teacher / cache-logits stage refuse the run folder as it is
  (a teacher or shard of another configuration)? The pipeline asks before `--from` deletes anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.model", "vocab.json", "vocab.txt")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(value: str, key: str, *, tokenizer: bool = False) -> None:
    """ConfigError naming `key` when `value` is neither a usable local folder nor a (reachable) hub id."""
    p = Path(value).expanduser()
    want = "a tokenizer folder" if tokenizer else "a model folder (config.json + weights)"
    if p.is_dir():
        if tokenizer and not any((p / n).is_file() for n in _TOKENIZER_FILES):
            raise ConfigError(f"{key}={value}: this folder is not a tokenizer folder (no {_TOKENIZER_FILES[0]}, "
                              f"{_TOKENIZER_FILES[1]} or sentencepiece model in it)")
        if not tokenizer and not (p / "config.json").is_file():
            raise ConfigError(f"{key}={value}: this folder is not a model folder (no config.json in it)")
        return
    if p.exists():
        raise ConfigError(f"{key}={value}: is a file; expected {want} or a hub id like org/name")
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value:
        raise ConfigError(f"{key}={value}: no such folder; expected {want} or a hub id like org/name")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ConfigError(f"{key}={value!r}: no such folder, and not a valid hub id (org/name)") from None
    if _hub_offline():
        probe = "tokenizer_config.json" if tokenizer else "config.json"
        if not isinstance(try_to_load_from_cache(value, probe), str):
            raise ConfigError(f"{key}={value}: no such folder, and the hub id is not in the local cache while the "
                              f"hub is offline (HF_HUB_OFFLINE=1); download it first, or give a local folder")


def check_run_config(cfg: Any) -> None:
    """What every stage needs from its config before it starts: a usable backbone and tokenizer source."""
    b = cfg.backbone
    if b.name_or_path != "auto":
        check_model_source(b.name_or_path, "backbone.name_or_path")
    if b.tokenizer:
        check_model_source(b.tokenizer, "backbone.tokenizer", tokenizer=True)


def _backbone_ready(cfg: Any) -> bool:
    from .backbone_recipe import resolve_backbone_path

    return cfg.backbone.name_or_path != "auto" or Path(resolve_backbone_path(cfg)).is_dir()


def check_teachers_state(cfg: Any) -> None:
    """Raise (ArtifactMismatchError naming the folder) when a published teacher belongs to another configuration:
    the teacher stage would refuse it. Damaged teachers pass: the stage retrains them."""
    from .artifacts import published_state, teacher_manifest
    from .backbone import load_run_backbone
    from .paths import RunPaths
    from .units import load_run_units

    paths = RunPaths.of(cfg)
    if not paths.teachers.is_dir() or not _backbone_ready(cfg):
        return
    ru, bb = load_run_units(cfg), load_run_backbone(cfg)
    for u in ru.units:
        m = teacher_manifest(cfg, u, ru.tasks[u], bb.arch, bb.tokenizer_hash)
        published_state(paths.teacher(u), m["hash"], damaged="rebuild", log=lambda _: None)


def check_cache_state(cfg: Any) -> None:
    """Raise (ArtifactMismatchError naming the shard's manifest and the field) when an existing cache shard belongs
    to another configuration: the cache stage would refuse it (a shard of an older teacher is rebuilt, not refused)."""
    import json

    from ..distill.logit_cache import FORMAT, MANIFEST_FILE, check_expect
    from .artifacts import check_temperatures, shard_fields
    from .backbone import load_run_backbone
    from .paths import RunPaths
    from .prompts import prompt_settings
    from .units import load_run_units

    check_temperatures(cfg.cache.temperature, cfg.finetune.temperature)
    paths = RunPaths.of(cfg)
    if not paths.logit_cache.is_dir() or not _backbone_ready(cfg):
        return
    ru, bb = load_run_units(cfg), load_run_backbone(cfg)
    settings = prompt_settings(cfg, bb.arch)
    for unit, tasks in ru.tasks.items():
        for t in tasks:
            mpath = paths.cache_shard(t.name) / MANIFEST_FILE
            try:
                manifest = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # absent or damaged: written (again) by the stage
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                continue
            fields = shard_fields(cfg, t, arch=bb.arch, tokenizer_hash=bb.tokenizer_hash, backbone_id=bb.identity,
                                  teacher_dir=paths.teacher(unit), vocab_size=bb.vocab_size, settings=settings,
                                  with_teacher_hash=False)
            check_expect({"mode": "topk", **manifest}, fields, str(mpath))
