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
from .io_utils import atomic_write_json, atomic_write_text, sha256_json
from .run.methods import baseline_modes, finetune_variants, needs_teachers, variant_config
from .run.dist import barrier, join_ranks
from .run.identity import stage_record_hash
from .run.paths import RunPaths

Log = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: the recipe module, which units it runs, where its outputs live."""

    name: str
    module: str                                        # recipe module: run(cfg, ...) and identity(cfg, sub)
    subs: Callable[[Any], list[Optional[str]]]          # the units it runs for this config ([None] = once)
    outputs: Callable[[RunPaths], list[Path]]          # what `--from` removes (the committed asset never)
    budget: Optional[str] = None                        # the config field stage_budgets_s[name] caps, if any
    record: Optional[Callable[[RunPaths], Path]] = None  # a folder whose stage.json, not a marker, says "done"

    def recipe(self):
        return importlib.import_module(self.module)


def _once(cfg) -> list[Optional[str]]:
    return [None]


def _if_teachers(cfg) -> list[Optional[str]]:
    return [None] if needs_teachers(cfg) else []


STAGES: tuple[Stage, ...] = (
    Stage("backbone", "tagi_ds.train.backbone_stage", _once, lambda p: [p.backbone]),
    Stage("teacher", "tagi_ds.train.teacher", _if_teachers, lambda p: [p.teachers, p.tb("teacher")],
          "teacher.time_budget_s"),
    Stage("cache-logits", "tagi_ds.train.cache_logits", _if_teachers, lambda p: [p.logit_cache]),
    Stage("pretrain", "tagi_ds.train.pretrain", lambda cfg: [None] if cfg.pretrain.enabled else [],
          lambda p: [p.pretrain, p.tb("pretrain")], "pretrain.time_budget_s"),
    Stage("finetune", "tagi_ds.train.finetune", finetune_variants, lambda p: [p.finetune_root, p.tb("finetune")],
          "finetune.time_budget_s"),
    Stage("baselines", "tagi_ds.train.baselines", baseline_modes,
          lambda p: [p.baselines_root] + [p.tb(f"baseline_{m}") for m in ("tk_instruct", "no_instruction")],
          "baselines.time_budget_s"),
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


def run(cfg: Any, from_stage: Optional[str] = None, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Run the pipeline; returns {"stages": [{stage, sub, status, seconds}], "seconds"}."""
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(STAGE_NAMES)}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
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
    if main_rank:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, dump_yaml(ecfg))
    if from_stage is not None and main_rank:
        redo = STAGE_NAMES[STAGE_NAMES.index(from_stage):]
        for name in redo:
            markers.clear(name)
            for p in stage(name).outputs(paths):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        log(f"pipeline: --from {from_stage}: removed the outputs of {', '.join(redo)}")
    barrier()
    t_all = time.perf_counter()
    record = []
    for st, sub in steps:
        name = st.name + (f" ({sub})" if sub else "")
        key_hash = sha256_json(identity(ecfg, st, sub))
        done = (stage_record_hash(st.record(paths)) == key_hash if st.record is not None
                else markers.done(st.name, sub, key_hash))
        if done:
            log(f"pipeline: {name}: skipped (done, config hash {key_hash[:12]})")
            record.append({"stage": st.name, "sub": sub, "status": "skipped", "seconds": 0.0})
            continue
        log(f"pipeline: {name}: running")
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
        log(f"pipeline: {name}: done in {secs:.0f} s{over}")
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
