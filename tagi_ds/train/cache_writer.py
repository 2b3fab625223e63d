"""Writing a teacher's logit-cache shards (a library, not a stage): the cache-logits stage calls it for its units,
and the teacher stage with `teacher.write_cache` calls it for the units it just trained, with the backbone it
already has (one array job per group of units instead of two, the backbone loaded once).

For each task of a published teacher unit, the teacher (backbone + its LoRA through the hooks) reads every training
instance once, on the prompt it was trained on (teacher.prompt: the full Tk-Instruct prompt or the instance part
alone; the labels, and so the label positions the student's KL reads, are the same either way), in batches of
cache.batch_size, and `CacheShardWriter` stores what the cache mode keeps (top-k,
sampled, priority: distill/teacher_rows.py) at every label position — T5: the decoder positions of the label;
LLaMA: the positions whose next token is a target token — in `<run_dir>/logit_cache/<task>/`, keyed by instance id.
A shard whose manifest matches is skipped; one that does not is refused (ArtifactMismatchError); a killed job leaves
only a hidden temp folder, removed when the shard is written again.

Also what every reader of a teacher shares beyond run/artifacts.py: the manifest and stage identity with the teacher
options (teacher.prompt, teacher.base) folded in, and the teacher's base model (teacher.base=multitask: the
tk_instruct baseline merged into the backbone while the teachers train, write their cache or are read live).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data.collate import PromptSettings, assemble, pad_id
from ..data.tasks import Task
from ..distill.logit_cache import CacheShardWriter, shard_is_complete
from ..errors import ArtifactMismatchError
from ..io_utils import sha256_json
from ..modeling.label_logits import model_label_logits
from ..modeling.lora import BatchedLoraHooks, merged_in_place
from ..run.artifacts import (check_shard_to_rebuild, record_teacher_stat, shard_fields, teacher_manifest,
                             teachers_identity)
from ..run.backbone import LoadedBackbone
from ..run.identity import config_identity
from ..run.paths import RunPaths
from ..run.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter
from ..run.prompts import encode_examples, prompt_settings, teacher_options, teacher_reads_instruction
from ..run.units import RunUnits

MULTITASK = "tk_instruct"  # the baseline that is the multitask model (teacher.base / finetune.kl_teacher / encoder)


# ------------------------------------------------------------------------------------------------ identities
def _options(cfg) -> dict[str, Any]:
    """teacher_options, plus what a multitask base depends on (the baseline's own settings)."""
    opts = teacher_options(cfg)
    if opts.get("base") == "multitask":
        opts["multitask"] = config_identity(cfg, ("seed", "lora", "baselines"))
    return opts


def teacher_manifest_of(cfg, unit: str, tasks, arch: str, tokenizer_hash: str) -> dict:
    """run.artifacts.teacher_manifest with the teacher options (prompt, base) in the hashed body when not default."""
    m = teacher_manifest(cfg, unit, tasks, arch, tokenizer_hash)
    opts = _options(cfg)
    if not opts:
        return m
    body = {**{k: v for k, v in m.items() if k != "hash"}, "options": opts}
    return {**body, "hash": sha256_json(body)}


def teachers_identity_of(cfg) -> dict:
    """run.artifacts.teachers_identity with the teacher options (the teacher and cache-logits stages' identity)."""
    ident = teachers_identity(cfg)
    opts = _options(cfg)
    if opts:
        ident["teacher"] = {**ident["teacher"], "options": opts}
    return ident


def teacher_shard_fields(cfg) -> dict[str, Any]:
    """The shard manifest fields that record a non-default teacher prompt / base (the finetune expects them too)."""
    return {f"teacher_{k}": v for k, v in teacher_options(cfg).items()}


def expected_shard_fields(cfg, task: Task, bb: LoadedBackbone, teacher_dir: Path) -> dict[str, Any]:
    fields = shard_fields(cfg, task, arch=bb.arch, tokenizer_hash=bb.tokenizer_hash, backbone_id=bb.identity,
                          teacher_dir=teacher_dir, vocab_size=bb.vocab_size, settings=prompt_settings(cfg, bb.arch))
    return {**fields, **teacher_shard_fields(cfg)}


# ------------------------------------------------------------------------------------------------ the base model
def multitask_adapter_dir(cfg, needed_by: str) -> Path:
    """The tk_instruct baseline's PEFT folder; ArtifactMismatchError naming who needs it when it is not trained."""
    folder = RunPaths.of(cfg).baseline(MULTITASK)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ArtifactMismatchError(
            f"{folder}: no trained {MULTITASK} baseline, and {needed_by} reads the multitask model; run "
            f"`tagi-ds baselines --config ... mode={MULTITASK}` first (the pipeline's baselines stage runs after "
            f"finetune unless its order is changed)")
    return folder


def merged_adapter(model: torch.nn.Module, specs, folder: Path) -> contextlib.AbstractContextManager:
    """`model` with the PEFT adapter in `folder` merged into its target weights for the duration (restored bit for
    bit on exit)."""
    adapters, scale, _ = read_peft_adapter(folder, specs, device="cpu")
    return merged_in_place(model, specs, adapters, scale, what=str(folder))


def teacher_base(cfg, bb: LoadedBackbone) -> contextlib.AbstractContextManager:
    """The teachers' base model for the duration: the backbone as it is (teacher.base=backbone), or with the
    tk_instruct baseline merged in (teacher.base=multitask)."""
    if cfg.teacher.base == "backbone":
        return contextlib.nullcontext(bb.model)
    return merged_adapter(bb.model, bb.specs, multitask_adapter_dir(cfg, "teacher.base=multitask"))


@torch.no_grad()
def write_task_shard(bb: LoadedBackbone, hooks: BatchedLoraHooks, adapters: dict, task: Task,
                     settings: PromptSettings, out_root: Path, fields: dict, batch_size: int,
                     with_instruction: bool = True) -> Path:
    """Run the teacher over `task`'s training instances, on its own prompt (`with_instruction`: the full prompt, else
    the instance part alone), and publish its shard (atomically, via the writer)."""
    examples = encode_examples(task, bb.tokenizer, settings, with_instruction=with_instruction)
    ids = [inst.id for inst in task.instances]
    pad = pad_id(bb.tokenizer)
    with CacheShardWriter(out_root, task.name, fields) as writer:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            batch = assemble(chunk, bb.arch, pad)
            inp, mask = batch["input_ids"].to(bb.device), batch["attention_mask"].to(bb.device)
            labels = batch["labels"].to(bb.device)
            with hooks.apply(adapters, torch.zeros(len(chunk), dtype=torch.long, device=bb.device)):
                lg, tg, rows = model_label_logits(bb.model, bb.arch == "llama", inp, mask, labels)  # (M, V), rows
            counts = torch.bincount(rows, minlength=len(chunk)).tolist()
            start = 0
            for j, n in enumerate(counts):
                if n != len(chunk[j].target):
                    raise ArtifactMismatchError(f"task {task.name}, instance {ids[s + j]}: {n} label positions "
                                                f"but {len(chunk[j].target)} target tokens")
                writer.add(ids[s + j], lg[start:start + n])  # (L_j, V): the writer takes log_softmax(/T) top-k
                start += n
    return out_root / task.name


def write_unit_shards(cfg, ru: RunUnits, unit: str, bb: LoadedBackbone, paths: RunPaths, log: Callable[[str], None],
                      stop: Optional[Callable[[], bool]] = None) -> tuple[list[str], list[str]]:
    """The shards of one published teacher unit's tasks; (written, skipped) task names. `stop()` is asked before
    each shard: a stop leaves every written shard complete and the rest for the rerun."""
    written, skipped = [], []
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
        return written, skipped
    settings = prompt_settings(cfg, bb.arch)
    adapters1, scale, _ = read_peft_adapter(paths.teacher(unit), bb.specs, device=bb.device)
    adapters = {mt: (a.unsqueeze(0), b.unsqueeze(0)) for mt, (a, b) in adapters1.items()}  # one "task" row
    hooks = BatchedLoraHooks(bb.model, bb.specs, scale)
    try:
        with teacher_base(cfg, bb):
            for t, fields in todo:
                if stop is not None and stop():
                    break
                shard = write_task_shard(bb, hooks, adapters, t, settings, paths.logit_cache, fields,
                                         cfg.cache.batch_size, with_instruction=teacher_reads_instruction(cfg))
                record_teacher_stat(shard, paths.teacher(unit) / ADAPTER_WEIGHTS)
                width = fields.get("k", fields.get("num_samples"))
                log(f"cache-logits {t.name}: wrote {shard} ({len(t.instances)} instances, {fields['mode']} {width}, "
                    f"T={fields['temperature']}, {cfg.teacher.prompt} prompt)")
                written.append(t.name)
    finally:
        hooks.remove()
    return written, skipped
