"""`tagi-ds pipeline --config configs/tiny.yaml [--from STAGE]`: every stage in order, in ONE process (what
`make demo` runs).

    backbone → teacher → cache-logits → pretrain → finetune (the variants cfg.eval.methods needs) → baselines → evaluate

- Each stage's wall-clock budget: cfg.stage_budgets_s[stage] when given (teacher: all teachers together; finetune:
  each variant; baselines: each baseline), else the stage's own time_budget_s.
- A finished stage leaves a done-marker <run_dir>/.pipeline/<stage>.json holding the hash of the config sections
  that decide its output; a rerun skips every stage whose marker matches (and the stages' own skip logic applies
  underneath: published teachers, complete cache shards, trained baselines). A stage whose inputs changed runs
  again; a stage interrupted half-way resumes from its own checkpoints.
- `--from STAGE` removes that stage's outputs and markers and those of every later stage, then runs them again.
- The resolved config is written to <run_dir>/config.yaml; stage timings to <run_dir>/pipeline.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import dump_yaml
from .errors import ConfigError
from .io_utils import atomic_write_json, atomic_write_text, sha256_json

STAGES = ("backbone", "teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate")
MARKER_DIR = ".pipeline"


# ------------------------------------------------------------------------------------------------ config pieces
def with_budgets(cfg: Any) -> Any:
    """A copy of cfg with cfg.stage_budgets_s written into the stages' own budget fields."""
    bad = sorted(set(cfg.stage_budgets_s) - set(STAGES))
    if bad:
        raise ConfigError(f"stage_budgets_s: unknown stage(s) {bad}; expected some of {list(STAGES)}")
    out = _deepcopy(cfg)
    b = cfg.stage_budgets_s
    if "teacher" in b:
        out.teacher.time_budget_s = float(b["teacher"])
    if "pretrain" in b:
        out.pretrain.time_budget_s = float(b["pretrain"])
    if "finetune" in b:
        out.finetune.time_budget_s = float(b["finetune"])
    if "baselines" in b:
        out.eval.baseline_time_budget_s = float(b["baselines"])
    return out


def _deepcopy(cfg: Any) -> Any:
    import copy

    return copy.deepcopy(cfg)


def _sections(cfg: Any, *names: str) -> dict:
    d = dataclasses.asdict(cfg)
    return {n: d[n] for n in names}


def stage_key(cfg: Any, stage: str, sub: Optional[str] = None) -> dict:
    """The config sections that decide a stage's output (later stages include their inputs' sections)."""
    base = ("seed", "data", "backbone")
    if stage == "backbone":
        key = _sections(cfg, "seed", "backbone")
        if cfg.backbone.name_or_path == "auto":  # the built backbone's recipe (SNI mode: the train split it reads)
            from .train.backbone_stage import recipe

            key["recipe"] = recipe(cfg)["hash"]
        return key
    if stage == "teacher":
        return _sections(cfg, *base, "lora", "teacher")
    if stage == "cache-logits":
        return _sections(cfg, *base, "lora", "teacher", "cache")
    if stage == "pretrain":
        return _sections(cfg, *base, "lora", "hypernet", "pretrain", "distributed")
    if stage == "finetune":
        from .eval.methods import variant_config

        v = variant_config(cfg, sub)
        return {"variant": sub, **_sections(v, *base, "lora", "hypernet", "teacher", "cache", "pretrain",
                                            "finetune", "distributed")}
    if stage == "baselines":
        return {"mode": sub, **_sections(cfg, *base, "lora"),
                "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k.startswith("baseline")}}
    if stage == "evaluate":
        d = dataclasses.asdict(cfg)
        return {k: v for k, v in d.items() if k not in ("name", "runs_dir", "stage_budgets_s", "threads", "device")}
    raise ConfigError(f"unknown pipeline stage {stage!r}; expected one of {list(STAGES)}")


def finetune_variants(cfg: Any) -> list[str]:
    from .eval.methods import HYPERNET_METHODS, check_methods

    return [m for m in check_methods(cfg.eval.methods) if m in HYPERNET_METHODS]


def baseline_modes(cfg: Any) -> list[str]:
    from .eval.methods import BASELINES

    return [m for m in cfg.eval.methods if m in BASELINES]


# ------------------------------------------------------------------------------------------------ markers
class Markers:
    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / MARKER_DIR

    def path(self, stage: str, sub: Optional[str] = None) -> Path:
        return self.root / (f"{stage}__{sub}.json" if sub else f"{stage}.json")

    def done(self, stage: str, sub: Optional[str], key_hash: str) -> bool:
        try:
            return json.loads(self.path(stage, sub).read_text()).get("hash") == key_hash
        except (OSError, ValueError, AttributeError):
            return False

    def mark(self, stage: str, sub: Optional[str], key_hash: str, seconds: float) -> None:
        atomic_write_json(self.path(stage, sub), {"stage": stage, "sub": sub, "hash": key_hash,
                                                  "seconds": round(seconds, 2), "finished_at": time.time()})

    def clear(self, stage: str) -> None:
        if self.root.is_dir():
            for p in self.root.glob(f"{stage}*.json"):
                if p.name == f"{stage}.json" or p.name.startswith(f"{stage}__"):
                    p.unlink()


def stage_outputs(run_dir: Path, stage: str) -> list[Path]:
    """What `--from` removes for a stage (the backbone stage's committed asset is never touched)."""
    r = Path(run_dir)
    return {"backbone": [r / "backbone"], "teacher": [r / "teachers", r / "tb" / "teacher"],
            "cache-logits": [r / "logit_cache"], "pretrain": [r / "pretrain", r / "tb" / "pretrain"],
            "finetune": [r / "finetune", r / "tb" / "finetune"], "baselines": [r / "baselines"],
            "evaluate": [r / "eval"]}[stage]


# ------------------------------------------------------------------------------------------------ stages
def _run_stage(cfg: Any, stage: str, sub: Optional[str], progress: bool, log: Callable[[str], None]) -> None:
    if stage == "backbone":
        from .train import backbone_stage

        backbone_stage.run(cfg, progress=progress)
    elif stage == "teacher":
        from .train import teacher

        teacher.run(cfg, progress=progress, log=log)
    elif stage == "cache-logits":
        from .train import cache_logits

        cache_logits.run(cfg, log=log)
    elif stage == "pretrain":
        from .train import pretrain

        pretrain.run(cfg, show_progress=progress)
    elif stage == "finetune":
        from .eval.methods import variant_config
        from .train import finetune

        finetune.run(variant_config(cfg, sub), variant=sub, show_progress=progress)
    elif stage == "baselines":
        from .eval.methods import ensure_baseline

        ensure_baseline(cfg, sub, log=log, progress=progress)
    elif stage == "evaluate":
        from .eval import evaluate

        evaluate.run(cfg, log=log)


def plan(cfg: Any) -> list[tuple[str, Optional[str]]]:
    """(stage, sub) in order; sub = finetune variant or baseline mode."""
    steps: list[tuple[str, Optional[str]]] = []
    for stage in STAGES:
        if stage == "pretrain" and not cfg.pretrain.enabled:
            continue
        if stage == "finetune":
            steps += [("finetune", v) for v in finetune_variants(cfg)]
        elif stage == "baselines":
            steps += [("baselines", m) for m in baseline_modes(cfg)]
        elif stage in ("teacher", "cache-logits"):
            if "teacher" in cfg.eval.methods or finetune_variants(cfg):
                steps.append((stage, None))
        else:
            steps.append((stage, None))
    return steps


def run(cfg: Any, from_stage: Optional[str] = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline; returns {"stages": [{stage, sub, status, seconds}], "seconds"}."""
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ecfg = with_budgets(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(ecfg))
    markers = Markers(run_dir)
    if from_stage is not None:
        for stage in STAGES[STAGES.index(from_stage):]:
            markers.clear(stage)
            for p in stage_outputs(run_dir, stage):
                shutil.rmtree(p, ignore_errors=True)
        log(f"pipeline: --from {from_stage}: removed the outputs of {', '.join(STAGES[STAGES.index(from_stage):])}")
    t_all = time.perf_counter()
    record = []
    for stage, sub in plan(ecfg):
        name = stage + (f" ({sub})" if sub else "")
        key_hash = sha256_json(stage_key(ecfg, stage, sub))
        if markers.done(stage, sub, key_hash):
            log(f"pipeline: {name}: skipped (done, config hash {key_hash[:12]})")
            record.append({"stage": stage, "sub": sub, "status": "skipped", "seconds": 0.0})
            continue
        log(f"pipeline: {name}: running")
        t0 = time.perf_counter()
        _run_stage(ecfg, stage, sub, progress, log)
        secs = time.perf_counter() - t0
        markers.mark(stage, sub, key_hash, secs)
        budget = cfg.stage_budgets_s.get(stage)
        over = f" (over its {budget:.0f} s budget)" if budget is not None and secs > 1.25 * budget + 30 else ""
        log(f"pipeline: {name}: done in {secs:.0f} s{over}")
        record.append({"stage": stage, "sub": sub, "status": "ran", "seconds": round(secs, 2)})
    total = time.perf_counter() - t_all
    summary = {"stages": record, "seconds": round(total, 2), "from": from_stage}
    atomic_write_json(run_dir / "pipeline.json", summary)
    log(f"pipeline: finished in {total:.0f} s; report: {run_dir / 'report.md'}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_stage", default=None, choices=STAGES,
                        help="redo this stage and every later one (their outputs are removed first)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    run(args.cfg, from_stage=args.from_stage, progress=not getattr(args, "no_progress", False))
    return 0
