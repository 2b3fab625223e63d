"""Stage `cache-logits`: each finished teacher's signal (top-k log-probs, or sampled ids: `cache.mode`) at every
label position of its training instances; the writing itself is train/cache_writer.py.

    tagi-ds cache-logits --config X.yaml [task=NAME | array_index=N]
    torchrun --nproc_per_node 8 -m tagi_ds.cli cache-logits --config X.yaml    # the units split over 8 GPUs

For each selected unit with a published teacher (teachers/<unit>/, checked against this config's teacher manifest),
the teacher (backbone + its LoRA through the hooks) reads every training instance of the unit's tasks once, on
its own prompt (teacher.prompt), in batches of cache.batch_size, and `CacheShardWriter` stores log_softmax(logits / cache.temperature) top-k
(cache.top_k) at every label position — T5: the decoder positions of the label; LLaMA: the positions whose next
token is a target token — in `<run_dir>/logit_cache/<task>/`, keyed by instance id.

The label ids are the student's: same tokenizer, same `Instance.label`, same `encode_target(.., max_target_length)`
truncation (`run.prompts.encode_examples` = `collate.collate_full`), so the finetune's KL aligns position by position
whatever prompt the teacher reads (teacher.prompt=input: the instance part alone, the student reads instruction +
input; only the label positions are stored, and they hold the same target tokens).
A shard whose manifest matches is skipped; one that does not is refused (ArtifactMismatchError); a killed job
leaves only a hidden temp folder, removed when the shard is written again.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from ..errors import ArtifactMismatchError
from ..run.artifacts import check_temperatures, published_state
from ..run.backbone import LoadedBackbone, load_run_backbone
from ..run.dist import barrier, join_ranks, my_share
from ..run.paths import RunPaths
from ..run.signals import StopSignals, Stopped
from ..run.units import RunUnits, load_run_units
from ..run.stage_lock import stage_locked
from .cache_writer import teacher_manifest_of, teachers_identity_of, write_unit_shards

EXTRA_KEYS = ("task", "array_index")


def identity(cfg, sub: Optional[str] = None) -> dict:
    """The teachers' identity plus the cache's own settings (mode, top-k / samples, temperature, estimator)."""
    cache = {k: v for k, v in vars(cfg.cache).items() if k != "batch_size"}
    return {**teachers_identity_of(cfg), "cache": cache}


def _teacher_ready(cfg, ru: RunUnits, unit: str, bb: LoadedBackbone, paths: RunPaths) -> bool:
    """True when this config's teacher of `unit` is published; a teacher of another configuration is refused."""
    m = teacher_manifest_of(cfg, unit, ru.tasks[unit], bb.arch, bb.tokenizer_hash)
    return published_state(paths.teacher(unit), m["hash"]) == "done"


@stage_locked("cache-logits")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log=print, task: Optional[str] = None,
        array_index: Optional[str] = None) -> dict[str, list[str]]:
    """Write the shards of the selected units (this rank's share of them under torchrun / srun). Returns
    {"written": tasks, "skipped": tasks, "no_teacher": units}; raises Stopped after SIGTERM (between shards)."""
    check_temperatures(cfg.cache.temperature, cfg.finetune.temperature)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    r, w = join_ranks(cfg.distributed.timeout_s)
    paths = RunPaths.of(cfg)
    ru = load_run_units(cfg)
    explicit = task is not None or array_index is not None
    selected = my_share(ru.select(task, array_index, cfg.teacher.units_per_job))
    bb = load_run_backbone(cfg)
    written, skipped, missing = [], [], []
    with StopSignals() as stop:
        for unit in selected:
            if not _teacher_ready(cfg, ru, unit, bb, paths):
                if explicit:
                    raise ArtifactMismatchError(f"{paths.teacher(unit)}: no teacher for unit {unit!r} yet; run "
                                                f"`tagi-ds teacher` for it (same config and index) first")
                log(f"cache-logits {unit}: no teacher yet; skipped")
                missing.append(unit)
                continue
            done, kept = write_unit_shards(cfg, ru, unit, bb, paths, log, stop=lambda: stop.should_stop(False))
            written += done
            skipped += kept
            if stop.requested:
                raise Stopped(f"cache-logits: {stop.requested}: {len(written)} shard(s) written, each complete; "
                              f"rerun the same command to write the rest")
    barrier()  # every rank's shards are on disk before a next stage reads them
    return {"written": written, "skipped": skipped, "no_teacher": missing}


def main(args: argparse.Namespace) -> int:
    extra = getattr(args, "extra", {}) or {}
    run(args.cfg, task=extra.get("task"), array_index=extra.get("array_index"))
    return 0
