"""Stage `teacher`: per-unit (task or category) LoRA teachers on the frozen backbone (or on the multitask model:
teacher.base), reading the full Tk-Instruct prompt or the instance part alone (teacher.prompt).

    tagi-ds teacher --config X.yaml                  # every unit, teacher.tasks_per_batch teachers per batch
    tagi-ds teacher --config X.yaml task=NAME        # one unit (a task, or a category with teacher.group_by=category)
    tagi-ds teacher --config X.yaml array_index=N    # unit N of the sorted unit list (Slurm job arrays)
    tagi-ds teacher --config X.yaml --list           # index → unit lines and the sbatch submit line

Output `<run_dir>/teachers/<unit>/`: a PEFT adapter directory (peft_io.write_peft_adapter: atomic) with
metrics.json (loss curve summary; held-back loss / ROUGE-L / EM of the teacher vs the zero-shot backbone) and
manifest.json (what produced it; its `hash` decides "same teacher"). A unit whose folder holds the same hash is
skipped; one with another hash is refused (ArtifactMismatchError names both hashes and the folder). Training
checkpoints live in `teachers/.ckpt/` until the batch is published; a rerun resumes from them (teacher.resume=auto).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from typing import Any, Optional, Sequence

import torch

from ..data.collate import EncodedPair, PromptSettings, assemble, pad_id
from ..data.tasks import Task
from ..metrics import compute_metrics
from ..modeling.label_logits import model_label_logits
from ..modeling.lora import BatchedLoraHooks
from ..run.artifacts import check_temperatures, published_state, with_weights_hash
from ..run.array import n_jobs, resolve_array_index, sbatch_line
from ..run.backbone import LoadedBackbone, load_run_backbone
from ..run.decode import decode_prompts
from ..run.dist import barrier, join_ranks, my_share
from ..run.paths import RunPaths
from ..run.peft_io import write_peft_adapter
from ..run.prompts import encode_examples, prompt_settings, teacher_examples
from ..run.signals import StopSignals, Stopped
from ..run.units import RunUnits, init_seed, load_run_units
from ..run.stage_lock import stage_locked
from .logging import TrainLogger
from .cache_writer import teacher_base, teacher_manifest_of, teachers_identity_of, write_unit_shards
from .teacher_batch import BatchedTeacherTrainer, UnitSpec

EXTRA_KEYS = ("task", "array_index")
TEACHERS_SBATCH = "slurm/teachers_array.sbatch"
CACHE_SBATCH = "slurm/cache_array.sbatch"


def identity(cfg, sub: Optional[str] = None) -> dict:
    return teachers_identity_of(cfg)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def label_losses(bb: LoadedBackbone, examples: Sequence[EncodedPair], row_unit: torch.Tensor, hooks, adapters,
                 batch_size: int) -> tuple[list[float], list[int]]:
    """Per row: summed label CE and label token count, with `adapters` through `hooks` (row_unit picks the unit)
    or without (hooks None: the zero-shot backbone)."""
    model, pad = bb.model, pad_id(bb.tokenizer)
    ce_sums, counts = [], []
    for s in range(0, len(examples), batch_size):
        chunk = list(examples[s:s + batch_size])
        batch = {k: v.to(bb.device) for k, v in assemble(chunk, bb.arch, pad).items()}
        ctx = hooks.apply(adapters, row_unit[s:s + batch_size].to(bb.device)) if hooks else contextlib.nullcontext()
        with ctx:
            lg, tg, rows = model_label_logits(model, bb.arch == "llama", batch["input_ids"], batch["attention_mask"],
                                              batch["labels"])
        ce = torch.nn.functional.cross_entropy(lg.float(), tg, reduction="none")
        ce_sums += torch.zeros(len(chunk), device=ce.device).index_add(0, rows, ce).tolist()
        counts += torch.bincount(rows, minlength=len(chunk)).tolist()
    return ce_sums, counts


def held_back_metrics(bb: LoadedBackbone, unit_tasks: Sequence[list[Task]], seen: dict[str, Task],
                      adapters: dict, scale: float, settings: PromptSettings, *, max_new_tokens: int,
                      batch_size: int, encode=None) -> list[dict]:
    """Per unit: held-back loss, ROUGE-L and EM of the teacher and of the zero-shot model (the teachers' base), each
    unit's numbers also per task (`per_task`). `encode(task, tokenizer, settings)` gives the prompts the teachers
    read (default: the full prompt)."""
    encode = encode or encode_examples
    examples: list[EncodedPair] = []
    refs: list[list[str]] = []
    row_unit: list[int] = []
    row_task: list[str] = []
    for i, tasks in enumerate(unit_tasks):
        for t in tasks:
            if t.name in seen:
                examples += encode(seen[t.name], bb.tokenizer, settings)
                refs += [list(inst.references) for inst in seen[t.name].instances]
                row_unit += [i] * len(seen[t.name].instances)
                row_task += [t.name] * len(seen[t.name].instances)
    if not examples:
        return [{"held_back": None} for _ in unit_tasks]
    rows = torch.tensor(row_unit, dtype=torch.long)
    hooks = BatchedLoraHooks(bb.model, bb.specs, scale, backend="auto")
    runs = {}
    try:
        for name, h in (("teacher", hooks), ("zero_shot", None)):
            ce, cnt = label_losses(bb, examples, rows, h, adapters, batch_size)
            preds = decode_prompts(bb.model, bb.tokenizer, bb.arch, [e.prompt for e in examples], device=bb.device,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, hooks=h, adapters=adapters,
                                   row_unit=row_unit)
            runs[name] = (ce, cnt, preds)
    finally:
        hooks.remove()
    out = []
    for i in range(len(unit_tasks)):
        idx = [j for j, u in enumerate(row_unit) if u == i]
        if not idx:
            out.append({"held_back": None})
            continue
        rec: dict[str, Any] = {"held_back_instances": len(idx)}
        for name, (ce, cnt, preds) in runs.items():
            m = compute_metrics([preds[j] for j in idx], [refs[j] for j in idx])
            rec[name] = {"loss": sum(ce[j] for j in idx) / max(1, sum(cnt[j] for j in idx)), **m,
                         "examples": [[preds[j], refs[j][0]] for j in idx[:3]]}
        preds = runs["teacher"][2]
        rec["per_task"] = {}
        for name in dict.fromkeys(row_task[j] for j in idx):
            rows = [j for j in idx if row_task[j] == name]
            rec["per_task"][name] = compute_metrics([preds[j] for j in rows], [refs[j] for j in rows])
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ the stage
def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def _loss_summary(losses: list[float]) -> dict:
    return {"loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
            "losses_every10": losses[::10], "steps_done": len(losses)}


def train_units(cfg, ru: RunUnits, units: Sequence[str], bb: LoadedBackbone, paths: RunPaths, *,
                time_budget_s: Optional[float] = None, progress: bool = True, log=print,
                stop: Optional[StopSignals] = None) -> list[str]:
    """Train and publish `units` together (one batch), for at most `time_budget_s` seconds. Returns the folders."""
    with teacher_base(cfg, bb):  # teacher.base=multitask: the tk_instruct baseline merged in, for training and metrics
        return _train_units(cfg, ru, units, bb, paths, time_budget_s=time_budget_s, progress=progress, log=log,
                            stop=stop)


def _train_units(cfg, ru: RunUnits, units: Sequence[str], bb: LoadedBackbone, paths: RunPaths, *,
                 time_budget_s: Optional[float], progress: bool, log, stop: Optional[StopSignals]) -> list[str]:
    settings = prompt_settings(cfg, bb.arch)
    manifests = [teacher_manifest_of(cfg, u, ru.tasks[u], bb.arch, bb.tokenizer_hash) for u in units]
    encode = lambda task, tok, st: teacher_examples(cfg, task, tok, st)  # noqa: E731 (teacher.prompt)
    specs_units = [UnitSpec(u, [e for t in ru.tasks[u] for e in encode(t, bb.tokenizer, settings)], m["seed"],
                            init_seed(cfg, u)) for u, m in zip(units, manifests)]
    tc = cfg.teacher
    trainer = BatchedTeacherTrainer(bb.model, bb.arch, bb.specs, specs_units, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                    dropout=cfg.lora.dropout, lr=tc.lr, steps=tc.steps, batch_size=tc.batch_size,
                                    warmup_steps=tc.warmup_steps, grad_clip=tc.grad_clip, pad_id=pad_id(bb.tokenizer),
                                    device=bb.device)
    ckpt = paths.teacher_ckpt(list(units))
    tag = {"units": list(units), "hashes": [m["hash"] for m in manifests]}
    if tc.resume == "never":
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        trainer.try_resume(ckpt, tag, log=log)
    logger = TrainLogger(paths.tb("teacher"), total_steps=tc.steps, enabled=True, initial_step=trainer.step_count,
                         show_progress=progress, desc=f"teacher x{len(units)}")

    def on_step(step: int, vals: list[float]) -> None:
        logger.advance()
        if step % 10 == 0 or step == tc.steps:
            logger.log_scalars(step, {f"teacher/{u}/loss": v for u, v in zip(units, vals)})

    try:
        res = trainer.train(ckpt_dir=ckpt, tag=tag, checkpoint_every=tc.checkpoint_every,
                            time_budget_s=time_budget_s, on_step=on_step,
                            stop=None if stop is None else (lambda: stop.should_stop(collective=False)))
    finally:
        logger.close()
        trainer.close()  # detach the training hooks even when interrupted
    if res.stopped_by_budget:
        log(f"teacher: time budget {tc.time_budget_s}s reached at step {res.steps}/{tc.steps}; publishing as is")
    adapters = {mt: (a.detach(), b.detach()) for mt, (a, b) in trainer.lora.adapters().items()}
    evals = held_back_metrics(bb, [ru.tasks[u] for u in units], ru.seen, adapters, trainer.scale, settings,
                              max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, encode=encode)
    task_type = "SEQ_2_SEQ_LM" if bb.arch == "t5" else "CAUSAL_LM"
    out = []
    for i, (u, m) in enumerate(zip(units, manifests)):
        metrics = {"unit": u, "tasks": m["data"]["tasks"], "train_instances": m["data"]["instances"],
                   **_loss_summary(res.losses[i]), "train_seconds": round(res.seconds, 2),
                   "stopped_by_budget": res.stopped_by_budget, "batched_with": len(units), **evals[i]}
        path = write_peft_adapter(paths.teacher(u), bb.specs, trainer.lora.unit(i), r=cfg.lora.r,
                                  alpha=cfg.lora.alpha, base_model=bb.path, task_type=task_type,
                                  extra_files={"metrics.json": metrics,
                                               "manifest.json": with_weights_hash(m, bb.specs, trainer.lora.unit(i))})
        log(_summary_line(u, metrics))
        out.append(str(path))
    shutil.rmtree(ckpt, ignore_errors=True)  # published: the checkpoint has done its job
    with contextlib.suppress(OSError):
        paths.teacher_ckpt_root.rmdir()  # only when no other batch has a checkpoint in progress
    return out


def _summary_line(unit: str, m: dict) -> str:
    line = f"teacher {unit}: {m['steps_done']} steps"
    if m["steps_done"]:
        line += f", train loss {m['loss_first10']:.3f} -> {m['loss_last10']:.3f}"
    if m.get("teacher"):
        t, z = m["teacher"], m["zero_shot"]
        line += (f"; held-back loss {t['loss']:.3f} (zero-shot {z['loss']:.3f}), ROUGE-L {t['rougeL']:.1f} "
                 f"(zero-shot {z['rougeL']:.1f}), EM {t['exact_match']:.1f} (zero-shot {z['exact_match']:.1f})")
    return line


@stage_locked("teacher")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log=print, task: Optional[str] = None,
        array_index: Optional[str] = None) -> dict[str, list[str]]:
    """Train the selected units that are not published yet (this rank's share of them under torchrun / srun: each
    rank its own units on its own GPU, nothing written twice); with `teacher.write_cache` also write their
    logit-cache shards. Returns {"trained": [...], "skipped": [...]}; raises Stopped after SIGTERM (checkpointed)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    r, w = join_ranks(cfg.distributed.timeout_s)
    paths = RunPaths.of(cfg)
    ru = load_run_units(cfg)
    selected = ru.select(task, array_index, cfg.teacher.units_per_job)
    bb = load_run_backbone(cfg)
    todo, skipped = [], []
    for u in selected:  # refuse any mismatch before training anything
        m = teacher_manifest_of(cfg, u, ru.tasks[u], bb.arch, bb.tokenizer_hash)
        if published_state(paths.teacher(u), m["hash"], damaged="rebuild", log=log) == "done":
            skipped.append(u)
            log(f"teacher {u}: skipped (published at {paths.teacher(u)}, manifest {m['hash'][:12]})")
        else:
            todo.append(u)
    todo, mine = my_share(todo), my_share(selected)
    if w > 1:
        log(f"teacher: rank {r}/{w} trains {len(todo)} unit(s)")
    k = max(1, cfg.teacher.tasks_per_batch)
    t0 = time.perf_counter()
    budget = cfg.teacher.time_budget_s
    with StopSignals() as stop:
        for s in range(0, len(todo), k):
            torch.manual_seed(cfg.seed)  # LoRA dropout draws: the same on a fresh run and a rerun
            left = None if budget is None else max(0.0, budget - (time.perf_counter() - t0))  # one budget, all batches
            train_units(cfg, ru, todo[s:s + k], bb, paths, time_budget_s=left, progress=progress, log=log, stop=stop)
        if cfg.teacher.write_cache:  # the same job, the backbone already loaded
            check_temperatures(cfg.cache.temperature, cfg.finetune.temperature)
            for u in mine:
                write_unit_shards(cfg, ru, u, bb, paths, log, stop=lambda: stop.should_stop(collective=False))
                if stop.requested:
                    raise Stopped(f"teacher: {stop.requested} while writing the cache; every written shard is "
                                  f"complete; rerun the same command to write the rest")
    barrier()  # every rank's teachers are published before anything reads them
    return {"trained": todo, "skipped": skipped}


def list_units(cfg, config_path: str) -> str:
    """index → units lines and the sbatch submit lines (teacher.units_per_job units per array element)."""
    ru = load_run_units(cfg)
    k, c = cfg.teacher.units_per_job, cfg.teacher.array_concurrency
    jobs = n_jobs(len(ru.units), k)
    lines = []
    for i in range(jobs):
        units = resolve_array_index(ru.units, i, k)
        extra = "" if ru.group_by == "task" else f"\t({sum(len(ru.tasks[u]) for u in units)} tasks)"
        lines.append(f"{i}\t{' '.join(units)}{extra}")
    lines.append(f"# {len(ru.units)} {ru.group_by} units, {k} per array element: {jobs} elements; submit from the "
                 f"repository root:")
    lines.append("mkdir -p logs && " + sbatch_line(TEACHERS_SBATCH, jobs, c, config_path))
    if cfg.teacher.write_cache:
        lines.append("# each element also writes its units' logit cache (teacher.write_cache)")
    else:
        lines.append("# then, once every teacher is published:")
        lines.append("mkdir -p logs && " + sbatch_line(CACHE_SBATCH, jobs, c, config_path))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="print index -> unit lines and the sbatch submit line, train nothing")


def main(args: argparse.Namespace) -> int:
    extra = getattr(args, "extra", {}) or {}
    if getattr(args, "list", False):
        print(list_units(args.cfg, args.config))
        return 0
    run(args.cfg, task=extra.get("task"), array_index=extra.get("array_index"))
    return 0
