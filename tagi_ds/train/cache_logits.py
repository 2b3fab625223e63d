"""Stage `cache-logits`: each finished teacher's top-k log-probs at every label position of its training instances.

    tagi-ds cache-logits --config X.yaml [task=NAME | array_index=N]

For each selected unit with a published teacher (teachers/<unit>/, checked against this config's teacher manifest),
the teacher (backbone + its LoRA through the hooks) reads every training instance of the unit's tasks once, in
batches of cache.batch_size, and `CacheShardWriter` stores log_softmax(logits / cache.temperature) top-k
(cache.top_k) at every label position — T5: the decoder positions of the label; LLaMA: the positions whose next
token is a target token — in `<run_dir>/logit_cache/<task>/`, keyed by instance id.

The label ids are the student's: same tokenizer, same `Instance.label`, same `encode_target(.., max_target_length)`
truncation (`teacher.encode_examples` = `collate.collate_full`), so the finetune's KL aligns position by position.
A shard whose manifest matches is skipped; one that does not is refused (ArtifactMismatchError); a killed job
leaves only a hidden temp folder, removed when the shard is written again.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.collate import PromptSettings, assemble, pad_id
from ..data.tasks import Task
from ..distill.logit_cache import CacheShardWriter, shard_is_complete
from ..errors import ArtifactMismatchError
from ..modeling.label_logits import align_label_logits
from ..modeling.lora import BatchedLoraHooks
from ..run.artifacts import (check_shard_to_rebuild, check_temperatures, published_state, shard_fields,
                             teacher_manifest, teachers_identity)
from ..run.backbone import LoadedBackbone, load_run_backbone
from ..run.paths import RunPaths
from ..run.peft_io import read_peft_adapter
from ..run.prompts import encode_examples, prompt_settings
from ..run.units import RunUnits, load_run_units
from ..run.stage_lock import stage_locked

EXTRA_KEYS = ("task", "array_index")


def identity(cfg, sub: Optional[str] = None) -> dict:
    """The teachers' identity plus the cache's own settings (top-k, temperature, missing-mass handling)."""
    cache = {k: v for k, v in vars(cfg.cache).items() if k != "batch_size"}
    return {**teachers_identity(cfg), "cache": cache}


def expected_shard_fields(cfg, task: Task, bb: LoadedBackbone, teacher_dir: Path) -> dict[str, Any]:
    return shard_fields(cfg, task, arch=bb.arch, tokenizer_hash=bb.tokenizer_hash, backbone_id=bb.identity,
                        teacher_dir=teacher_dir, vocab_size=bb.vocab_size, settings=prompt_settings(cfg, bb.arch))


@torch.no_grad()
def write_task_shard(bb: LoadedBackbone, hooks: BatchedLoraHooks, adapters: dict, task: Task,
                     settings: PromptSettings, out_root: Path, fields: dict, batch_size: int) -> Path:
    """Run the teacher over `task`'s training instances and publish its shard (atomically, via the writer)."""
    examples = encode_examples(task, bb.tokenizer, settings)
    ids = [inst.id for inst in task.instances]
    pad = pad_id(bb.tokenizer)
    with CacheShardWriter(out_root, task.name, fields) as writer:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            batch = assemble(chunk, bb.arch, pad)
            inp, mask = batch["input_ids"].to(bb.device), batch["attention_mask"].to(bb.device)
            labels = batch["labels"].to(bb.device)
            with hooks.apply(adapters, torch.zeros(len(chunk), dtype=torch.long, device=bb.device)):
                if bb.arch == "t5":
                    dec = bb.model.prepare_decoder_input_ids_from_labels(labels=labels)
                    logits = bb.model(input_ids=inp, attention_mask=mask, decoder_input_ids=dec,
                                      use_cache=False).logits
                else:
                    logits = bb.model(input_ids=inp, attention_mask=mask, use_cache=False).logits
            lg, tg, rows = align_label_logits(logits, labels, bb.arch == "llama")  # (M, V) in row order
            counts = torch.bincount(rows, minlength=len(chunk)).tolist()
            start = 0
            for j, n in enumerate(counts):
                if n != len(chunk[j].target):
                    raise ArtifactMismatchError(f"task {task.name}, instance {ids[s + j]}: {n} label positions "
                                                f"but {len(chunk[j].target)} target tokens")
                writer.add(ids[s + j], lg[start:start + n])  # (L_j, V): the writer takes log_softmax(/T) top-k
                start += n
    return out_root / task.name


def _teacher_ready(cfg, ru: RunUnits, unit: str, bb: LoadedBackbone, paths: RunPaths) -> bool:
    """True when this config's teacher of `unit` is published; a teacher of another configuration is refused."""
    m = teacher_manifest(cfg, unit, ru.tasks[unit], bb.arch, bb.tokenizer_hash)
    return published_state(paths.teacher(unit), m["hash"]) == "done"


@stage_locked("cache-logits")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log=print, task: Optional[str] = None,
        array_index: Optional[str] = None) -> dict[str, list[str]]:
    """Write the shards of the selected units. Returns {"written": tasks, "skipped": tasks, "no_teacher": units}."""
    check_temperatures(cfg.cache.temperature, cfg.finetune.temperature)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = RunPaths.of(cfg)
    ru = load_run_units(cfg)
    explicit = task is not None or array_index is not None
    selected = ru.select(task, array_index)
    bb = load_run_backbone(cfg)
    settings = prompt_settings(cfg, bb.arch)
    written, skipped, missing = [], [], []
    for unit in selected:
        if not _teacher_ready(cfg, ru, unit, bb, paths):
            if explicit:
                raise ArtifactMismatchError(f"{paths.teacher(unit)}: no teacher for unit {unit!r} yet; run "
                                            f"`tagi-ds teacher` for it (same config and index) first")
            log(f"cache-logits {unit}: no teacher yet; skipped")
            missing.append(unit)
            continue
        todo: list[tuple[Task, dict]] = []
        for t in ru.tasks[unit]:
            fields = expected_shard_fields(cfg, t, bb, paths.teacher(unit))
            shard = paths.cache_shard(t.name)
            if shard_is_complete(shard, fields):
                log(f"cache-logits {t.name}: skipped (shard at {shard} matches)")
                skipped.append(t.name)
                continue
            if shard.exists():
                check_shard_to_rebuild(shard, fields, log)  # damaged / stale teacher: rebuilt; other config: refused
            todo.append((t, fields))
        if not todo:
            continue
        adapters1, scale, _ = read_peft_adapter(paths.teacher(unit), bb.specs, device=bb.device)
        adapters = {mt: (a.unsqueeze(0), b.unsqueeze(0)) for mt, (a, b) in adapters1.items()}  # one "task" row
        hooks = BatchedLoraHooks(bb.model, bb.specs, scale)
        try:
            for t, fields in todo:
                shard = write_task_shard(bb, hooks, adapters, t, settings, paths.logit_cache, fields,
                                         cfg.cache.batch_size)
                log(f"cache-logits {t.name}: wrote {shard} ({len(t.instances)} instances, k={fields['k']}, "
                    f"T={fields['temperature']})")
                written.append(t.name)
        finally:
            hooks.remove()
    return {"written": written, "skipped": skipped, "no_teacher": missing}


def main(args: argparse.Namespace) -> int:
    extra = getattr(args, "extra", {}) or {}
    run(args.cfg, task=extra.get("task"), array_index=extra.get("array_index"))
    return 0
