"""Writing a teacher's logit-cache shards (a library, not a stage): the cache-logits stage calls it for its units,
and the teacher stage with `teacher.write_cache` calls it for the units it just trained, with the backbone it
already has (one array job per group of units instead of two, the backbone loaded once).

For each task of a published teacher unit, the teacher (backbone + its LoRA through the hooks) reads every training
instance once, in batches of cache.batch_size, and `CacheShardWriter` stores what the cache mode keeps (top-k,
sampled, priority: distill/teacher_rows.py) at every label position — T5: the decoder positions of the label;
LLaMA: the positions whose next token is a target token — in `<run_dir>/logit_cache/<task>/`, keyed by instance id.
A shard whose manifest matches is skipped; one that does not is refused (ArtifactMismatchError); a killed job leaves
only a hidden temp folder, removed when the shard is written again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data.collate import PromptSettings, assemble, pad_id
from ..data.tasks import Task
from ..distill.logit_cache import CacheShardReader, CacheShardWriter, shard_is_complete
from ..errors import ArtifactMismatchError
from ..modeling.label_logits import align_label_logits
from ..modeling.lora import BatchedLoraHooks
from ..run.artifacts import record_teacher_stat, shard_fields
from ..run.backbone import LoadedBackbone
from ..run.paths import RunPaths
from ..run.peft_io import ADAPTER_WEIGHTS, read_peft_adapter
from ..run.prompts import encode_examples, prompt_settings
from ..run.units import RunUnits


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
            CacheShardReader(shard, fields)  # raises ArtifactMismatchError naming the differing field
            raise ArtifactMismatchError(f"{shard}: existing shard does not match this run; remove it to rebuild")
        todo.append((t, fields))
    if not todo:
        return written, skipped
    settings = prompt_settings(cfg, bb.arch)
    adapters1, scale, _ = read_peft_adapter(paths.teacher(unit), bb.specs, device=bb.device)
    adapters = {mt: (a.unsqueeze(0), b.unsqueeze(0)) for mt, (a, b) in adapters1.items()}  # one "task" row
    hooks = BatchedLoraHooks(bb.model, bb.specs, scale)
    try:
        for t, fields in todo:
            if stop is not None and stop():
                break
            shard = write_task_shard(bb, hooks, adapters, t, settings, paths.logit_cache, fields,
                                     cfg.cache.batch_size)
            record_teacher_stat(shard, paths.teacher(unit) / ADAPTER_WEIGHTS)
            width = fields.get("k", fields.get("num_samples"))
            log(f"cache-logits {t.name}: wrote {shard} ({len(t.instances)} instances, {fields['mode']} {width}, "
                f"T={fields['temperature']})")
            written.append(t.name)
    finally:
        hooks.remove()
    return written, skipped
