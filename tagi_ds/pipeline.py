"""`tagi-ds pipeline --config configs/tiny.yaml [--from STAGE]`: every stage in order, in ONE process (what
`make demo` runs).

    backbone → teacher → cache-logits → pretrain → finetune (per variant) → baselines (per mode) → evaluate

The stages are a table (`STAGES`): each is a recipe module with `run(cfg, ...)` and `identity(cfg, sub)`, and a rule
for which units it runs (`subs`: finetune variants, baseline modes). A finished stage leaves a done-marker
<run_dir>/.pipeline/<stage>[__<sub>].json holding the hash of its identity; a rerun skips a stage whose marker matches
(and the stages' own skip logic applies underneath: published teachers, complete cache shards, trained baselines,
stage records). A stage interrupted half-way resumes from its own checkpoints.

- Each stage's wall-clock cap: cfg.stage_budgets_s[stage] (teacher: all teachers together; finetune: each variant;
  baselines: each baseline), else the stage's own time_budget_s.
- `--from STAGE` removes that stage's outputs and markers and those of every later stage, then runs them again.
- The resolved config is written to <run_dir>/config.yaml; stage timings to <run_dir>/pipeline.json.

Nothing is written or deleted before everything the run needs is checked (`validate`): the config and methods, the
backbone source, the task data, every stage's own config checks, and whether a stage that will run (and that
`--from` keeps) would refuse its folder (outputs of another configuration); `--from` also refuses while another
process holds a lock of a stage it would delete. A refused run changes nothing, config.yaml included. One pipeline
per run folder at a time (the `pipeline` lock); each stage holds its own lock too (run/stage_lock.py).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import dump_yaml
from .errors import ConfigError
from .io_utils import LockHeldError, atomic_write_json, atomic_write_text, lock_holders, sha256_json
from .run.identity import check_stage_record, stage_record_hash
from .run.methods import baseline_modes, finetune_variants, needs_teachers, variant_config
from .run.dist import barrier, join_ranks
from .run.paths import RunPaths
from .run.stage_lock import stage_lock

Log = Callable[[str], None]
VALIDATES_ITSELF = True  # the CLI leaves the backbone-source check to `validate`, after the recipes' own preflights


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: the recipe module, which units it runs, where its outputs live."""

    name: str
    module: str                                        # recipe module: run(cfg, ...) and identity(cfg, sub)
    subs: Callable[[Any], list[Optional[str]]]          # the units it runs for this config ([None] = once)
    outputs: Callable[[RunPaths], list[Path]]          # what `--from` removes (the committed asset never)
    budget: Optional[str] = None                        # the config field stage_budgets_s[name] caps, if any
    record: Optional[Callable[[RunPaths], Path]] = None  # a folder whose stage.json, not a marker, says "done"
    folder: Optional[Callable[[RunPaths, Optional[str]], Path]] = None  # a unit's folder with its stage.json
    reads_tasks: bool = True                            # loads the run's task data (validated up front)

    def recipe(self):
        return importlib.import_module(self.module)


def _once(cfg) -> list[Optional[str]]:
    return [None]


def _if_teachers(cfg) -> list[Optional[str]]:
    return [None] if needs_teachers(cfg) else []


STAGES: tuple[Stage, ...] = (
    Stage("backbone", "tagi_ds.train.backbone_stage", _once, lambda p: [p.backbone], reads_tasks=False),
    Stage("teacher", "tagi_ds.train.teacher", _if_teachers, lambda p: [p.teachers, p.tb("teacher")],
          "teacher.time_budget_s"),
    Stage("cache-logits", "tagi_ds.train.cache_logits", _if_teachers, lambda p: [p.logit_cache]),
    Stage("pretrain", "tagi_ds.train.pretrain", lambda cfg: [None] if cfg.pretrain.enabled else [],
          lambda p: [p.pretrain, p.tb("pretrain")], "pretrain.time_budget_s", folder=lambda p, sub: p.pretrain,
          reads_tasks=False),
    Stage("finetune", "tagi_ds.train.finetune", finetune_variants, lambda p: [p.finetune_root, p.tb("finetune")],
          "finetune.time_budget_s", folder=lambda p, sub: p.finetune(sub)),
    Stage("baselines", "tagi_ds.train.baselines", baseline_modes,
          lambda p: [p.baselines_root] + [p.tb(f"baseline_{m}") for m in ("tk_instruct", "no_instruction")],
          "baselines.time_budget_s", folder=lambda p, sub: p.baseline(sub)),
    # The report says itself which configuration it belongs to (eval/stage.json): a standalone `tagi-ds evaluate`
    # of another configuration changes what "done" means here, so no marker can go stale.
    Stage("evaluate", "tagi_ds.eval.evaluate", _once,
          lambda p: [p.eval, p.report, p.report_json] + sorted(p.run_dir.glob("*.png")), record=lambda p: p.eval),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown pipeline stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")


# ------------------------------------------------------------------------------------------------ config pieces
def with_budgets(cfg: Any) -> Any:
    """A copy of cfg with cfg.stage_budgets_s written into the stages' own budget fields."""
    bad = sorted(set(cfg.stage_budgets_s) - set(STAGE_NAMES))
    if bad:
        raise ConfigError(f"stage_budgets_s: unknown stage(s) {bad}; expected some of {list(STAGE_NAMES)}")
    out = copy.deepcopy(cfg)
    for name, seconds in cfg.stage_budgets_s.items():
        field = stage(name).budget
        if field is None:
            raise ConfigError(f"stage_budgets_s.{name}: this stage has no time budget")
        section, key = field.split(".")
        setattr(getattr(out, section), key, float(seconds))
    return out


def stage_config(cfg: Any, st: Stage, sub: Optional[str]) -> Any:
    """The config a unit runs with: a finetune variant's overrides applied."""
    return variant_config(cfg, sub) if st.name == "finetune" else cfg


def identity(cfg: Any, st: Stage, sub: Optional[str]) -> dict:
    return st.recipe().identity(stage_config(cfg, st, sub), sub)


def plan(cfg: Any) -> list[tuple[Stage, Optional[str]]]:
    """(stage, sub) in order; sub = finetune variant or baseline mode."""
    return [(st, sub) for st in STAGES for sub in st.subs(cfg)]


# ------------------------------------------------------------------------------------------------ markers
class Markers:
    def __init__(self, paths: RunPaths):
        self.root = paths.markers

    def path(self, stage_name: str, sub: Optional[str] = None) -> Path:
        return self.root / (f"{stage_name}__{sub}.json" if sub else f"{stage_name}.json")

    def done(self, stage_name: str, sub: Optional[str], key_hash: str) -> bool:
        try:
            return json.loads(self.path(stage_name, sub).read_text()).get("hash") == key_hash
        except (OSError, ValueError, AttributeError):
            return False

    def mark(self, stage_name: str, sub: Optional[str], key_hash: str, seconds: float) -> None:
        atomic_write_json(self.path(stage_name, sub), {"stage": stage_name, "sub": sub, "hash": key_hash,
                                                       "seconds": round(seconds, 2), "finished_at": time.time()})

    def clear(self, stage_name: str) -> None:
        if self.root.is_dir():
            for p in self.root.glob(f"{stage_name}*.json"):
                if p.name == f"{stage_name}.json" or p.name.startswith(f"{stage_name}__"):
                    p.unlink()


# ------------------------------------------------------------------------------------------------ running
def run_stage(cfg: Any, st: Stage, sub: Optional[str], progress: bool, log: Log) -> None:
    """One unit of one stage: every recipe's `run(cfg, sub, *, progress, log)`."""
    st.recipe().run(stage_config(cfg, st, sub), sub, progress=progress, log=log)


def archive_report(paths: RunPaths, log: Log) -> None:
    """A report of another configuration is versioned, never overwritten: eval/ and the report files move to
    eval_archive/<its identity hash>/ before the evaluation reruns."""
    old = stage_record_hash(paths.eval)
    if old is None:
        return
    dest = paths.eval_archive(old)
    dest.mkdir(parents=True, exist_ok=True)
    for p in stage("evaluate").outputs(paths):
        if p.exists():
            shutil.move(str(p), str(dest / p.name))
    log(f"pipeline: evaluate: the previous report (another configuration) moved to {dest}")


@dataclass
class Step:
    """One unit of one stage in this run: its identity hash and whether it is done (skipped) or will run."""

    stage: Stage
    sub: Optional[str]
    key_hash: str
    done: bool

    @property
    def label(self) -> str:
        return self.stage.name + (f" ({self.sub})" if self.sub else "")


def _record_stage_name(step: Step) -> str:
    """The stage name a unit's stage.json is checked under (the recipe's own wording)."""
    return f"baselines ({step.sub})" if step.stage.name == "baselines" else step.stage.name


def finished(st: Stage, sub: Optional[str], key_hash: str, paths: RunPaths, markers: Optional[Markers] = None
             ) -> bool:
    """Whether the run folder `paths` holds unit (st, sub) finished for the identity hashed as `key_hash`: its
    record's hash (stages with a stage.json) or its done-marker's."""
    if st.record is not None:
        return stage_record_hash(st.record(paths)) == key_hash
    return (markers or Markers(paths)).done(st.name, sub, key_hash)


def validate(cfg: Any, ecfg: Any, paths: RunPaths, markers: Markers, from_stage: Optional[str]) -> list[Step]:
    """Everything the run needs, checked before anything is written or deleted; returns the steps."""
    from .run.preflight import check_cache_state, check_run_config, check_teachers_state

    redo = set(STAGE_NAMES[STAGE_NAMES.index(from_stage):]) if from_stage is not None else set()
    check_run_config(ecfg)
    steps = []
    for st, sub in plan(ecfg):
        key_hash = sha256_json(identity(ecfg, st, sub))
        done = st.name not in redo and finished(st, sub, key_hash, paths, markers)
        steps.append(Step(st, sub, key_hash, done))
    todo = [s for s in steps if not s.done]
    for step in todo:  # the recipes' own config checks (finetune: variant name, weights, temperatures)
        check = getattr(step.stage.recipe(), "check_config", None)
        if check is not None:
            check(stage_config(ecfg, step.stage, step.sub), step.sub)
    if any(s.stage.reads_tasks for s in todo):
        from .data.registry import load_run_tasks_from_config

        load_run_tasks_from_config(ecfg)  # DataError naming the file / folder, before anything is touched
    for step in todo:  # would the stage refuse its folder as it stands (outputs of another configuration)?
        if step.stage.name in redo:
            continue
        if step.stage.folder is not None:
            check_stage_record(step.stage.folder(paths, step.sub), _record_stage_name(step),
                               identity(ecfg, step.stage, step.sub))
        elif step.stage.name == "teacher":
            check_teachers_state(ecfg)
        elif step.stage.name == "cache-logits":
            check_cache_state(ecfg)
    for name in sorted(redo):
        for p in stage(name).outputs(paths):
            if p.exists() or p.is_symlink():
                paths.inside(p)
        busy = lock_holders(paths.stage_locks(name))
        if busy:
            raise LockHeldError(f"pipeline --from {from_stage}: stage {name} is being written by {busy[0]}; "
                                f"nothing was removed: wait for it to finish (or stop it), then rerun")
    return steps


def _remove_outputs(paths: RunPaths, markers: Markers, from_stage: str, log: Log) -> None:
    redo = STAGE_NAMES[STAGE_NAMES.index(from_stage):]
    for name in redo:
        markers.clear(name)
        for p in stage(name).outputs(paths):
            p = paths.inside(p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    log(f"pipeline: --from {from_stage}: removed the outputs of {', '.join(redo)}")


def run(cfg: Any, from_stage: Optional[str] = None, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Run the pipeline; returns {"stages": [{stage, sub, status, seconds}], "seconds"}."""
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(STAGE_NAMES)}")
    ecfg = with_budgets(cfg)
    steps = plan(ecfg)
    # Each recipe's cheap checks (a missing corpus, say) before anything runs or is deleted: a scale run must not
    # learn of a bad path hours in, after the teachers.
    for st in {st.name: st for st, _ in steps}.values():
        check = getattr(st.recipe(), "preflight", None)
        if check is not None:
            check(ecfg)
    paths = RunPaths.of(cfg)
    # Under torchrun / srun every rank runs the pipeline: the stages split their units (teachers, shards) or train
    # together (DeepSpeed); only rank 0 deletes or writes the pipeline's own files, the others wait at a barrier.
    r, _ = join_ranks(cfg.distributed.timeout_s)
    main_rank = r == 0
    markers = Markers(paths)
    with stage_lock(cfg, "pipeline", log=log):  # one pipeline per run folder (rank 0 holds it)
        steps = validate(cfg, ecfg, paths, markers, from_stage)  # every rank: the same inputs, the same verdict
        # Validated: from here on the run writes.
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if main_rank:
            paths.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(paths.config, dump_yaml(ecfg))
            if from_stage is not None:
                _remove_outputs(paths, markers, from_stage, log)
        barrier()
        t_all = time.perf_counter()
        record = []
        for step in steps:
            st, sub, key_hash = step.stage, step.sub, step.key_hash
            if step.done:
                log(f"pipeline: {step.label}: skipped (done, config hash {key_hash[:12]})")
                record.append({"stage": st.name, "sub": sub, "status": "skipped", "seconds": 0.0})
                continue
            log(f"pipeline: {step.label}: running")
            if st.name == "evaluate" and main_rank:
                archive_report(paths, log)
            barrier()
            t0 = time.perf_counter()
            run_stage(ecfg, st, sub, progress, log)
            barrier()
            secs = time.perf_counter() - t0
            if main_rank:
                markers.mark(st.name, sub, key_hash, secs)
            budget = cfg.stage_budgets_s.get(st.name)
            over = f" (over its {budget:.0f} s budget)" if budget is not None and secs > 1.25 * budget + 30 else ""
            log(f"pipeline: {step.label}: done in {secs:.0f} s{over}")
            record.append({"stage": st.name, "sub": sub, "status": "ran", "seconds": round(secs, 2)})
        total = time.perf_counter() - t_all
        summary = {"stages": record, "seconds": round(total, 2), "from": from_stage}
        if main_rank:
            atomic_write_json(paths.pipeline_record, summary)
    log(f"pipeline: finished in {total:.0f} s; report: {paths.report}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_stage", default=None, choices=STAGE_NAMES,
                        help="redo this stage and every later one (their outputs are removed first)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    run(args.cfg, from_stage=args.from_stage, progress=not getattr(args, "no_progress", False))
    return 0
