"""Stage `tagi-ds evaluate --config X`: every method of cfg.eval.methods in ONE harness, then the report.

    tagi-ds evaluate --config X.yaml                        # one process (the pipeline's way)
    torchrun --nproc_per_node=8 -m tagi_ds.cli evaluate --config X.yaml     # 8 ranks, one GPU each (srun works too)
    tagi-ds evaluate --config X.yaml shard=2/4              # one of 4 shards (shard=array: a Slurm array element)
    tagi-ds evaluate --config X.yaml --list [--shards N]    # what each of N shards answers, what is done, how to submit

Same tasks, backbone, tokenizer, prompt layout, greedy decoding (eval.max_new_tokens) and rank classification for
every method (methods.py says how each one runs). Splits: the run's evaluation splits (synthetic: seen,
unseen_paraphrase, unseen_composition, plus "unseen" = the two pooled; SNI / P3: seen, unseen). P3 tasks with answer
choices are rank-classified (eval.rank_classification: token mean by default, as TAGI's scorer).

Sharded and resumable (shards.py): each (method, split) is cut into units of tasks; process r of W answers its
contiguous share of the units on its own device (LOCAL_RANK) and publishes one shard file per (method, split, shard).
A rerun answers only the shards whose file is missing or belongs to another configuration. Then one process merges
(under torchrun / srun: rank 0, behind a barrier; a Slurm array: whichever element finds every shard present), and
writes the merged predictions, the scores and the report. SIGTERM / SIGUSR1 (Slurm's warning before the time
limit) stop it before the next unit of tasks: the units answered so far are kept beside their shard file, the
command exits 75 and its rerun continues after them.

Outputs under <run_dir>:
  eval/shards/<method>/<split>/<i>-of-<n>.json  one shard's rows and throughput (kept: a rerun reuses them)
  eval/shards/<method>/<split>/<i>-of-<n>.partial.json  the first units of a shard stopped by a signal
  eval/predictions/<method>/<split>.jsonl   {"task", "id", "input", "prediction", "references"} per instance
                                            (+ "choice", "label", "scores" when rank-classified)
  eval/metrics.json                         per method and split: overall, per task, per category, rank
                                            classification (accuracy per prompt / dataset, mean, median); the echo
                                            reference; FLOPs inputs; throughput (instances/s, tokens/s per process)
  eval/stage.json                           the identity of the configuration the report belongs to: an evaluation
                                            of another configuration is refused before anything is written
  report.json, report.md, *.png             report.write_report (schema: report.py)
Cost columns: analytic per-instance inference FLOPs relative to tk_instruct (eval/flops.py; once-per-task work
amortised over the run's test instances per task) and measured seconds per instance relative to tk_instruct (summed
over the shards; a unit's setup, e.g. a hypernetwork unit's instruction encoding, is included).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import ArtifactMismatchError
from ..io_utils import atomic_write_json
from ..run import dist
from ..run.backbone import LoadedBackbone, load_run_backbone
from ..run.identity import check_stage_record, config_identity, identity_hash, write_stage_record
from ..run.methods import check_methods
from ..run.paths import RunPaths
from ..run.signals import StopSignals, Stopped
from ..run.stage_lock import stage_locked
from .costs import cost_lengths, relative_costs, training_curves
from ..run.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter
from ..run.prompts import prompt_settings, source_ids, teacher_reads_instruction
from .methods import Hypernet, Method, Teachers, UnitStats, answer_tasks, build_method, merged_lora, method_units
from .rank_classification import HELDOUT_DATASETS
from .scoring import (POOLED, demo_output_scores, echo_scores, eval_splits, pooled_splits,
                      rank_classification_report, read_predictions, score_split, seen_source, write_predictions)
from .shards import (Shard, artifact_fingerprint, parse_shard, process_shard, read_shard, shard_key, shard_path,
                     shard_tasks, write_shard)

# The stage, and the scoring helpers tests and tools have always imported from here.
__all__ = ["STAGE", "EXTRA_KEYS", "identity", "run", "main", "list_shards", "POOLED", "eval_splits", "pooled_splits",
           "score_split", "echo_scores", "demo_output_scores", "read_predictions", "write_predictions"]
STAGE = "evaluate"
EXTRA_KEYS = ("shard",)
# eval keys that change how the work is cut and batched, not what is computed: outside the identity (a report is
# not refused over them), inside each shard file's key (a shard is reused only under the same plan).
EXECUTION_KEYS = ("batch_size", "rank_batch_size", "tasks_per_batch", "teacher_group_bytes")
Log = Callable[[str], None]
# The one collective is the barrier before the merge, and ranks reach it hours apart when their shards' lengths
# differ; a rank that dies takes the step down anyway (torchrun's agent, srun --kill-on-bad-exit), so the wait is
# bounded by the job's time limit rather than by distributed.timeout_s.
BARRIER_TIMEOUT_S = 48 * 3600.0


def identity(cfg, sub: Optional[str] = None) -> dict:
    """The report depends on every setting but the runtime ones: all stages' sections and the evaluation's."""
    ident = config_identity(cfg, ("seed", "data", "backbone", "lora", "hypernet", "teacher", "cache", "pretrain",
                                  "finetune", "baselines", "eval"))
    ident["eval"] = {k: v for k, v in ident["eval"].items() if k not in EXECUTION_KEYS}
    return ident


def execution_plan(cfg) -> dict[str, Any]:
    return {k: getattr(cfg.eval, k) for k in EXECUTION_KEYS}


# ------------------------------------------------------------------------------------------------ options
# The distillation set-ups (teacher.prompt / teacher.base, hypernet.encoder) change how two methods run; they are
# wrapped here, around eval/methods.py's objects, so each teacher is read on its own prompt and base and each
# hypernetwork reads instructions as it was trained to.
@dataclass
class OptionTeachers(Teachers):
    """`teacher`, read as trained: on the instance part alone (teacher.prompt=input) and / or on top of the merged
    tk_instruct baseline (teacher.base=multitask)."""

    def artifacts(self) -> list[Path]:
        extra = [] if self.cfg.teacher.base == "backbone" else [_multitask_dir(self.cfg) / ADAPTER_WEIGHTS]
        return super().artifacts() + extra

    @contextlib.contextmanager
    def session(self):
        if self.cfg.teacher.base == "backbone":
            yield
            return
        adapters, scale, _ = read_peft_adapter(_multitask_dir(self.cfg), self.bb.specs, device="cpu")
        with merged_lora(self.bb.model, self.bb.specs, adapters, scale):
            yield

    @contextlib.contextmanager
    def unit(self, tasks):
        with super().unit(tasks) as ans:
            if teacher_reads_instruction(self.cfg):
                yield ans
                return
            settings, tok = prompt_settings(self.cfg, self.bb.arch), self.bb.tokenizer
            yield dataclasses.replace(ans, sources=lambda ti: [
                source_ids(tasks[ti], inst, tok, settings, with_instruction=False) for inst in tasks[ti].instances])


@dataclass
class MultitaskEncoderHypernet(Hypernet):
    """A hypernetwork method trained with hypernet.encoder=multitask: its instructions read through backbone + the
    tk_instruct LoRA, as in training."""

    def artifacts(self) -> list[Path]:
        return super().artifacts() + [_multitask_dir(self.cfg) / ADAPTER_WEIGHTS]

    @contextlib.contextmanager
    def session(self):
        with super().session():
            adapters, scale, _ = read_peft_adapter(_multitask_dir(self.cfg), self.bb.specs, device="cpu")
            self.student.set_instruction_adapter(adapters, scale)
            yield


def _multitask_dir(cfg) -> Path:
    folder = RunPaths.of(cfg).baseline("tk_instruct")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ArtifactMismatchError(f"{folder}: no trained tk_instruct baseline; teacher.base / hypernet.encoder = "
                                    f"multitask read it (run `tagi-ds baselines mode=tk_instruct` first)")
    return folder


def method_for(cfg, name: str, splits: dict, bb: LoadedBackbone, log: Log) -> Optional[Method]:
    """eval.methods.build_method, with the distillation options applied to the teacher and hypernetwork methods."""
    m = build_method(cfg, name, splits, bb, log)
    if isinstance(m, Teachers) and (cfg.teacher.prompt != "full" or cfg.teacher.base != "backbone"):
        return OptionTeachers(m.cfg, m.bb, m.units, m.name)
    if isinstance(m, Hypernet) and cfg.hypernet.encoder == "multitask":
        return MultitaskEncoderHypernet(m.cfg, m.bb, m.name, m.export)
    return m


# ------------------------------------------------------------------------------------------------ shard jobs
@dataclass
class Job:
    """One (method, split, shard): the units it answers and the file it publishes."""

    method: str
    split: str
    shard: Shard
    units: list[list[int]]
    key: str
    path: Path

    def instances(self, tasks) -> int:
        return sum(len(tasks[i].instances) for u in self.units for i in u)


def plan_jobs(cfg, m: Method, splits: dict, shards: Sequence[Shard], ident_hash: str) -> list[Job]:
    """Every job of method `m` for the given shards (all splits it answers), keys included."""
    paths, plan = RunPaths.of(cfg), execution_plan(cfg)
    fingerprint = artifact_fingerprint(m.artifacts())
    jobs = []
    for split, tasks in splits.items():
        if not tasks or not m.answers(split):
            continue
        units = method_units(cfg, m, tasks)
        for sh in shards:
            mine = shard_tasks(tasks, units, sh)
            jobs.append(Job(m.name, split, sh, mine, shard_key(ident_hash, m.name, split, sh, fingerprint, plan,
                                                               tasks, mine), shard_path(paths, m.name, split, sh)))
    return jobs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def answer_jobs(cfg, m: Method, jobs: Sequence[Job], splits: dict, bb: LoadedBackbone, *, progress: bool,
                log: Log, stop: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Answer the jobs whose shard file is missing (or of another key) and publish each one when complete. `stop()`
    (the signal's name once SIGTERM / SIGUSR1 arrived) is asked before each unit: a stop saves the units answered so
    far beside the shard file (its `.partial.json`, which the rerun continues from) and raises Stopped."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if read_shard(j.path, j.key) is None]
    if len(todo) < len(jobs):
        log(f"evaluate {m.name}: {len(jobs) - len(todo)} shard file(s) already complete, reused")
    if not todo:
        return
    where = f" [shard {todo[0].shard}]" if todo[0].shard.count > 1 else ""
    bar = tqdm(total=sum(j.instances(splits[j.split]) for j in todo), desc=f"evaluate {m.name}{where}",
               unit="inst", disable=not progress, leave=False)
    try:
        with m.session():
            for job in todo:
                rows, done, before = read_partial(job, splits[job.split], log)
                stats = UnitStats()
                t0 = time.perf_counter()
                for k in range(done, len(job.units)):
                    why = stop() if stop is not None else None
                    if why:  # a unit is the smallest piece a rerun can continue from
                        kept = "every finished shard file kept"
                        if k > 0:
                            _sync(bb.device)
                            saved = write_partial(job, rows, k, _add(before, time.perf_counter() - t0, rows, stats))
                            kept = f"{k} of {len(job.units)} unit(s) of {m.name} {job.split} kept in {saved}, {kept}"
                        raise Stopped(f"evaluate: {why}: {kept}; rerun the same command to continue")
                    rows += answer_tasks(cfg, m, splits[job.split], [job.units[k]], bb, stats, on_batch=bar.update)
                _sync(bb.device)
                record = _add(before, time.perf_counter() - t0, rows, stats)
                write_shard(job.path, job.key, rows, record)
                partial_path(job.path).unlink(missing_ok=True)
                log(f"evaluate {m.name} {job.split}{where}: {_rates(record)}")
    finally:
        bar.close()


def _add(before: dict[str, Any], secs: float, rows: list[dict], stats: UnitStats) -> dict[str, Any]:
    """A shard's record: this process's seconds and counts plus those of the run it continues (`before`)."""
    now = stats.as_dict()
    return {"seconds": round(before.get("seconds", 0.0) + secs, 4), "instances": len(rows),
            **{k: int(before.get(k, 0)) + v for k, v in now.items()}}


def partial_path(shard_file: Path) -> Path:
    return shard_file.with_name(shard_file.stem + ".partial.json")


def write_partial(job: Job, rows: list[dict], units_done: int, record: dict[str, Any]) -> Path:
    path = partial_path(job.path)
    atomic_write_json(path, {"key": job.key, "units_done": units_done, "stats": record, "rows": rows})
    return path


def read_partial(job: Job, tasks: Sequence, log: Log) -> tuple[list[dict], int, dict[str, Any]]:
    """(rows, units answered, their record) saved by a stopped run of this very job; nothing when there is none, or
    it is of another key or does not hold exactly the rows of its first units (then it is answered again)."""
    path = partial_path(job.path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        done, rows = int(obj["units_done"]), obj["rows"]
        want = [(tasks[i].name, inst.id) for u in job.units[:done] for i in u for inst in tasks[i].instances]
        if obj["key"] != job.key or not 0 < done <= len(job.units) or [(r["task"], r["id"]) for r in rows] != want:
            raise ValueError("another job")
    except FileNotFoundError:
        return [], 0, {}
    except (OSError, ValueError, KeyError, TypeError):
        log(f"evaluate {job.method} {job.split}: {path} is not a partial shard of this configuration; answering "
            f"its units again")
        return [], 0, {}
    log(f"evaluate {job.method} {job.split}: continuing after {done} of {len(job.units)} unit(s) saved in {path}")
    return rows, done, dict(obj.get("stats") or {})


def _rates(stats: dict[str, Any]) -> str:
    """'N instances in S s (x inst/s; G generated tokens, y tok/s; R rank-classified, z scored tok/s)'."""
    secs = max(stats["seconds"], 1e-9)
    parts = [f"{stats['instances'] / secs:.1f} inst/s"]
    if stats.get("generated"):
        parts.append(f"{stats['generated']} generated: {stats['generated_tokens'] / secs:.1f} tok/s")
    if stats.get("rank_classified"):
        parts.append(f"{stats['rank_classified']} rank-classified: {stats['forwarded_tokens'] / secs:.0f} scored tok/s")
    return f"{stats['instances']} instances in {stats['seconds']:.1f} s ({'; '.join(parts)})"


# ------------------------------------------------------------------------------------------------ merging
@dataclass
class Merged:
    """One method's merged rows per split (None: no number there) and its summed throughput."""

    rows: dict[str, Optional[list[dict]]]
    stats: dict[str, float]


def merge_method(cfg, m: Optional[Method], name: str, splits: dict, count: int, ident_hash: str
                 ) -> tuple[Merged, list[Path]]:
    """The method's rows from all `count` shards of every split it answers; the missing shard files listed."""
    rows: dict[str, Optional[list[dict]]] = {s: None for s in splits}
    totals = {"seconds": 0.0, "instances": 0, "generated": 0, "generated_tokens": 0, "rank_classified": 0,
              "forwarded_tokens": 0, "shards": 0}
    missing: list[Path] = []
    if m is None:
        return Merged(rows, totals), missing
    jobs = plan_jobs(cfg, m, splits, [Shard(i, count) for i in range(count)], ident_hash)
    for split in {j.split for j in jobs}:
        merged = []
        for job in sorted((j for j in jobs if j.split == split), key=lambda j: j.shard.index):
            obj = read_shard(job.path, job.key)
            if obj is None:
                missing.append(job.path)
                continue
            merged += obj["rows"]
            for k in totals:
                totals[k] += obj["stats"].get(k, 0) if k != "shards" else 1
        want = [(t.name, i.id) for t in splits[split] for i in t.instances]
        if not missing and [(r["task"], r["id"]) for r in merged] != want:
            raise ArtifactMismatchError(f"{shard_path(RunPaths.of(cfg), name, split, Shard(0, count)).parent}: the "
                                        f"shard files do not cover the split's instances in order; remove the folder")
        rows[split] = merged
    return Merged(rows, totals), missing


def _throughput(stats: dict[str, float]) -> dict[str, Any]:
    secs = max(stats["seconds"], 1e-9)
    return {"seconds": round(stats["seconds"], 3), "instances": int(stats["instances"]),
            "seconds_per_instance": stats["seconds"] / stats["instances"],
            "instances_per_s": stats["instances"] / secs, "generated_tokens": int(stats["generated_tokens"]),
            "generated_tokens_per_s": stats["generated_tokens"] / secs,
            "rank_classified": int(stats["rank_classified"]), "forwarded_tokens": int(stats["forwarded_tokens"]),
            "forwarded_tokens_per_s": stats["forwarded_tokens"] / secs, "shards": int(stats["shards"])}


# ------------------------------------------------------------------------------------------------ the stage
def _process_group(cfg) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the group): joins the process group when launched with several
    processes (torchrun, srun), or uses the caller's."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    if launched or torch.distributed.is_initialized():
        created = not torch.distributed.is_initialized()
        info = dist.init_distributed(max(cfg.distributed.timeout_s, BARRIER_TIMEOUT_S), use_deepspeed=False)
        return info.rank, info.world_size, created
    return 0, 1, False


@stage_locked("evaluate")  # one writer per stage folder (run/stage_lock.py)
def run(cfg: Any, sub: Optional[str] = None, *, progress: bool = True, log: Log = print,
        methods: Optional[Sequence[str]] = None, shard: Optional[Shard] = None) -> Optional[dict[str, Any]]:
    """Answer this process's shards of `methods` (default cfg.eval.methods); then, on the merging process, merge,
    score and write predictions, metrics and the report. Returns the report.json object where it was written, None
    on the other ranks and on an array element that is not the last."""
    from .report import read_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    methods = check_methods(methods if methods is not None else cfg.eval.methods)
    rank, world, own_group = _process_group(cfg)
    mine = process_shard(shard, rank, world)
    paths = RunPaths.of(cfg)
    # Before anything is written: a report of another configuration is never overwritten (pipeline --from evaluate
    # or another run name redoes it).
    record = check_stage_record(paths.eval, STAGE, identity(cfg))
    ident_hash = identity_hash(identity(cfg))
    splits = eval_splits(cfg)
    bb = load_run_backbone(cfg)
    bb.gradient_checkpointing = False  # inference only (and the student refuses HF's checkpointing)
    t_all = time.perf_counter()
    objs: dict[str, Optional[Method]] = {}
    with StopSignals() as sig:  # SIGTERM / SIGUSR1: stop at the next unit, keeping what was answered
        def stop() -> Optional[str]:  # ranks answer their shards independently: no collective
            return sig.requested if sig.should_stop(collective=False) else None

        for name in methods:
            objs[name] = method_for(cfg, name, splits, bb, log if rank == 0 else (lambda _msg: None))
            if objs[name] is not None:
                answer_jobs(cfg, objs[name], plan_jobs(cfg, objs[name], splits, [mine], ident_hash), splits, bb,
                            progress=progress, log=log, stop=stop)
    dist.barrier()  # every rank's shards are published
    if own_group:  # the merge needs no collective: the group this stage created ends here, on every rank
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    merged, missing = {}, []
    for name in methods:
        merged[name], gone = merge_method(cfg, objs[name], name, splits, mine.count, ident_hash)
        missing += gone
    if missing:
        if shard is None:  # every shard belongs to this launch: a rank that finished without its files is a bug
            raise ArtifactMismatchError(f"evaluate: {len(missing)} shard file(s) missing after every rank finished, "
                                        f"e.g. {missing[0]}")
        log(f"evaluate: shard {mine} done; {len(missing)} shard file(s) of other shards still missing (e.g. "
            f"{missing[0]}): the last shard to finish writes the report")
        return None
    write_outputs(cfg, methods, splits, merged, bb, time.perf_counter() - t_all, log)
    write_stage_record(paths.eval, record)
    log(f"evaluate: report in {paths.report} ({time.perf_counter() - t_all:.0f} s)")
    return read_report(paths.run_dir)


def write_outputs(cfg, methods: Sequence[str], splits: dict, merged: dict[str, Merged], bb: LoadedBackbone,
                  seconds: float, log: Log) -> None:
    """Merged predictions, metrics.json and the report."""
    from .report import write_report

    paths = RunPaths.of(cfg)
    pooled = pooled_splits(splits)
    details: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, Any]] = {}
    ranked: dict[str, dict[str, Any]] = {}
    for m in methods:
        details[m], results[m], by_split = {}, {}, merged[m].rows
        for split, tasks in splits.items():
            rows = by_split.get(split)
            if rows is None:
                results[m][split] = None
                continue
            preds = [r["prediction"] for r in rows]
            extra = [{k: r[k] for k in ("choice", "label", "scores") if k in r} for r in rows]
            write_predictions(paths.predictions(m, split), tasks, preds, extra)
            details[m][split] = score_split(tasks, preds)
            rc = rank_classification_report(tasks, rows)
            if rc is not None:
                details[m][split]["rank_classification"] = ranked.setdefault(m, {})[split] = rc
            results[m][split] = details[m][split]["overall"]
        for name, parts in pooled.items():
            if all(by_split.get(p) is not None for p in parts):
                tasks = [t for p in parts for t in splits[p]]
                details[m][name] = score_split(tasks, [r["prediction"] for p in parts for r in by_split[p]])
                results[m][name] = details[m][name]["overall"]
            else:
                results[m][name] = None
        if merged[m].stats["instances"]:
            timing[m] = _throughput(merged[m].stats)
        shown = ", ".join(f"{s} {r['exact_match']:.1f}/{r['rougeL']:.1f}" for s, r in results[m].items() if r)
        acc = (ranked.get(m) or {}).get("unseen")
        acc_txt = f"; unseen rank-classification accuracy mean {acc['mean']:.1f} median {acc['median']:.1f}" if acc \
            else ""
        log(f"evaluate {m}: {shown or 'no numbers'} (EM/R-L{acc_txt})")
    lengths = cost_lengths(cfg, splits, bb.tokenizer, bb.arch)
    rel = relative_costs(cfg, methods, lengths, bb)
    tk_time = timing.get("tk_instruct", {}).get("seconds_per_instance")
    for m in methods:
        results[m]["relative_flops"] = rel[m]
        if m in timing:
            timing[m]["relative_time"] = (timing[m]["seconds_per_instance"] / tk_time) if tk_time else None
    echo, demo = echo_scores(splits), demo_output_scores(splits)
    seen_from = seen_source(splits)
    floors = [{"floor": label, **{f"{sp} EM / R-L": (f"{v[sp]['exact_match']:.2f} / {v[sp]['rougeL']:.2f}"
                                                    if v.get(sp) else "—") for sp in echo}}
              for label, v in (("copy the input", echo), ("copy the first demonstration's output", demo))]
    tables = {"Cost per instance (FLOPs: analytic; time: measured in this run)": _cost_rows(methods, rel, timing),
              "Throughput per process": _throughput_rows(methods, timing)}
    if any("unseen" in r for r in ranked.values()):
        how = "per-token mean" if cfg.eval.rank_classification == "mean" else "summed"
        tables[f"Held-out P3 accuracy (rank classification, {how} log-likelihood; mean and median over datasets, "
               f"the median of the datasets' medians over prompts)"] = _p3_rows(methods, ranked)
    tables["Trivial floors"] = floors
    unseen = [s for s in splits if s.startswith("unseen")]
    tables["Unseen exact match per task"] = _per_task_rows(details, methods, unseen, "exact_match")
    tables["Unseen ROUGE-L per task"] = _per_task_rows(details, methods, unseen)
    atomic_write_json(paths.eval_metrics, {"methods": details, "echo": echo, "demo_output": demo, "timing": timing,
                                           "rank_classification": {"reduction": cfg.eval.rank_classification,
                                                                   "by_method": ranked},
                                           "seen_from": seen_from,
                                           "flops": {"lengths": lengths, "relative": rel},
                                           "splits": {s: [t.name for t in ts] for s, ts in splits.items()},
                                           "seconds": seconds})
    title = f"TAGI evaluation report: run {cfg.name} ({cfg.data.source})"
    write_report(paths.run_dir, results, curves=training_curves(paths, methods), extra_tables=tables, echo=echo,
                 timings={m: t["seconds_per_instance"] for m, t in timing.items()}, title=title,
                 notes=_seen_note(seen_from),
                 split_labels={"seen": "seen (TRAIN instances)"} if seen_from == "train_instances" else None)


def _seen_note(seen_from: Optional[str]) -> list[str]:
    if seen_from == "train_instances":
        return ["**seen = TRAINING-SET accuracy**: this data holds no instances of the training tasks back, so the "
                "seen columns score instances the methods were trained on (a fit check, not seen-task "
                "generalisation)."]
    if seen_from == "held_back":
        return ["seen: held-out instances of the training tasks (never trained on)."]
    return []


def _cost_rows(methods, rel, timing) -> list[dict]:
    return [{"method": m, "rel. FLOPs": round(rel[m], 3),
             "ms / instance": round(1000 * timing[m]["seconds_per_instance"], 3) if m in timing else "—",
             "rel. time": (round(timing[m]["relative_time"], 3)
                           if m in timing and timing[m].get("relative_time") is not None else "—")}
            for m in methods]


def _throughput_rows(methods, timing) -> list[dict]:
    return [{"method": m, "instances": t["instances"], "instances / s": round(t["instances_per_s"], 2),
             "generated tokens / s": round(t["generated_tokens_per_s"], 1),
             "rank-classified": t["rank_classified"], "scored tokens / s": round(t["forwarded_tokens_per_s"], 1),
             "shard files": t["shards"]} for m, t in ((m, timing.get(m)) for m in methods) if t]


def _p3_rows(methods, ranked) -> list[dict]:
    """One row per held-out dataset (T0's order; — where absent), then the mean and the median over datasets."""
    reps = {m: ranked[m]["unseen"] for m in methods if "unseen" in ranked.get(m, {})}
    names = list(HELDOUT_DATASETS) + sorted({d for r in reps.values() for d in r["datasets"]} - set(HELDOUT_DATASETS))
    rows = []
    for ds in names:
        cells = {m: r["datasets"][ds]["mean"] if ds in r["datasets"] else None for m, r in reps.items()}
        prompts = max((len(r["datasets"][ds]["prompts"]) for r in reps.values() if ds in r["datasets"]), default=0)
        rows.append({"dataset": ds, "prompts": prompts or "—",
                     **{m: ("—" if v is None else round(v, 2)) for m, v in cells.items()}})
    rows.append({"dataset": "**mean**", "prompts": "", **{m: round(r["mean"], 2) for m, r in reps.items()}})
    rows.append({"dataset": "**median**", "prompts": "", **{m: round(r["median"], 2) for m, r in reps.items()}})
    return rows


def _per_task_rows(details: dict, methods: Sequence[str], splits: Sequence[str], metric: str = "rougeL"
                   ) -> list[dict]:
    rows = []
    for split in splits:
        names: list[str] = []
        for m in methods:
            names += [n for n in (details[m].get(split) or {}).get("per_task", {}) if n not in names]
        for n in names:
            row: dict[str, Any] = {"task": n, "split": split}
            for m in methods:
                pt = (details[m].get(split) or {}).get("per_task", {})
                row[m] = round(pt[n][metric], 1) if n in pt else "—"
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ CLI
def list_shards(cfg, count: int, config_path: str) -> str:
    """What each of `count` shards answers per (method, split), which shard files are complete, how to submit."""
    splits = eval_splits(cfg)
    bb = load_run_backbone(cfg)
    ident_hash = identity_hash(identity(cfg))
    lines = ["# method\tsplit\tshard\ttasks\tinstances\tstatus"]
    notes: list[str] = []
    for name in check_methods(cfg.eval.methods):
        m = method_for(cfg, name, splits, bb, notes.append)
        if m is None:
            continue
        for job in plan_jobs(cfg, m, splits, [Shard(i, count) for i in range(count)], ident_hash):
            tasks = splits[job.split]
            done = "done" if read_shard(job.path, job.key) is not None else "todo"
            lines.append(f"{name}\t{job.split}\t{job.shard}\t{sum(map(len, job.units))}\t{job.instances(tasks)}\t"
                         f"{done}")
    lines += [f"# {n}" for n in notes]
    lines += [f"# {count} process(es), one GPU each; submit from the repository root, one of:",
              f"torchrun --nproc_per_node={count} -m tagi_ds.cli evaluate --config {config_path}",
              f"mkdir -p logs && sbatch --ntasks-per-node={count} --gpus-per-node={count} slurm/evaluate.sbatch "
              f"{config_path}",
              f"mkdir -p logs && sbatch --array=0-{count - 1} slurm/evaluate.sbatch {config_path}   "
              f"# {count} single-GPU jobs; the last to finish writes the report"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="print what each shard answers and which shard files are done; evaluate nothing")
    parser.add_argument("--shards", type=int, default=None,
                        help="with --list: the number of shards (default: shard=i/n's n, else WORLD_SIZE, else 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    extra = getattr(args, "extra", {}) or {}
    shard = parse_shard(extra.get("shard"))
    if getattr(args, "list", False):
        count = args.shards or (shard.count if shard else int(os.environ.get("WORLD_SIZE", "1")))
        print(list_shards(args.cfg, max(1, count), args.config))
        return 0
    run(args.cfg, progress=not getattr(args, "no_progress", False), shard=shard)
    return 0
