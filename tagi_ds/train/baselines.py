"""Stage `baselines`: the multitask LoRA baselines every TAGI table compares against, trained on all training tasks.

    tagi-ds baselines --config X.yaml                     # every baseline of eval.methods
    tagi-ds baselines --config X.yaml mode=tk_instruct    # one of them

- tk_instruct: a LoRA on the frozen backbone reading the full Tk-Instruct prompt (definition + demonstrations + input);
- no_instruction: the same LoRA reading the instance part alone.
Prompts are encoded exactly as the teachers' and the frozen backbone's (run/prompts.py: one encoder, one truncation
rule), loss on the answer tokens only. Training follows the measured recipe (../shared/OFFLINE_DEMO_EVIDENCE.md):
AdamW betas (0.9, 0.98), weight decay 0.01, linear warmup then linear decay to 0 at `baselines.steps`, clip 1.0; the
time budget only stops a run that is too slow. On the synthetic suite, batches draw primitives 60% and compositions
40% of the time (data.synthetic.task_weights, the measured mix); elsewhere instances uniformly.

Output `<run_dir>/baselines/<mode>/` (atomic): PEFT adapter folder (base = the backbone's absolute path), train.json
(steps, seconds, loss curve), stage.json (the identity; a folder of another configuration is refused).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..data.collate import EncodedPair, assemble, pad_id
from ..data.registry import load_run_tasks_from_config
from ..data.tasks import Task
from ..errors import ConfigError, DataError
from ..io_utils import atomic_dir, atomic_write_json
from ..run.backbone import load_run_backbone
from ..run.identity import STAGE_RECORD, check_stage_record, config_identity, stage_record_hash, task_data
from ..run.methods import BASELINES, baseline_modes
from ..run.paths import RunPaths
from ..run.prompts import encode_examples, prompt_settings
from ..run.stage_lock import stage_locked
from .logging import TrainLogger
from .loop import train_loop

STAGE = "baselines"
EXTRA_KEYS = ("mode",)
TRAIN_RECORD = "train.json"
SYNTHETIC_PRIMITIVE_SHARE = 0.6  # synthetic suite: primitives' share of the draws (data.synthetic.task_weights)


def identity(cfg, sub: Optional[str] = None) -> dict:
    """One baseline (`sub` = its mode): the task data, the backbone, the LoRA shape and the baselines section."""
    return {"mode": sub, **task_data(config_identity(cfg, ("seed", "data", "backbone", "lora", "baselines")))}


def _draw(tasks: Sequence[Task], weights: Optional[Sequence[float]], rng: random.Random) -> Callable[[], tuple]:
    """A function drawing (task index, instance index): uniform over instances, or tasks by `weights`."""
    pool = [(ti, ii) for ti, t in enumerate(tasks) for ii in range(len(t.instances))]
    if not pool:
        raise DataError("baselines: the training tasks hold no instances")
    if weights is None:
        return lambda: pool[rng.randrange(len(pool))]
    if len(weights) != len(tasks):
        raise ConfigError(f"baselines: {len(weights)} task weights for {len(tasks)} tasks")
    live = [(ti, w) for ti, (t, w) in enumerate(zip(tasks, weights)) if t.instances and w > 0]
    idx, ws = [ti for ti, _ in live], [w for _, w in live]

    def draw() -> tuple[int, int]:
        ti = rng.choices(idx, weights=ws)[0]
        return ti, rng.randrange(len(tasks[ti].instances))
    return draw


def baseline_examples(task: Task, tokenizer, settings, mode: str) -> list[EncodedPair]:
    """A baseline's training pairs: the teachers' and the frozen backbone's own prompt encoding (run/prompts.py),
    the full Tk-Instruct source for tk_instruct, the instance part alone for no_instruction."""
    if mode not in BASELINES:
        raise ConfigError(f"baselines: unknown mode {mode!r}; expected one of {list(BASELINES)}")
    return encode_examples(task, tokenizer, settings, with_instruction=mode == "tk_instruct")


def train_baseline(cfg, mode: str, out: Path, record: dict, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> Path:
    """Train one baseline and publish its folder atomically."""
    from peft import LoraConfig, get_peft_model

    from ..data.synthetic import task_weights

    bb = load_run_backbone(cfg)
    b = cfg.baselines
    tasks = load_run_tasks_from_config(cfg)["train"]
    weights = task_weights(tasks, SYNTHETIC_PRIMITIVE_SHARE) if cfg.data.source == "synthetic" else None
    settings = prompt_settings(cfg, bb.arch)
    torch.manual_seed(cfg.seed)
    targets = sorted({s.name.rsplit(".", 1)[-1] for s in bb.specs})  # PEFT target names of the run's LoRA kinds
    model = get_peft_model(bb.model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=targets,
                                                lora_dropout=0.0, bias="none"))
    draw = _draw(tasks, weights, random.Random(f"{cfg.seed}:multitask:{mode}"))
    encoded: dict[int, list[EncodedPair]] = {}  # per task, on first draw: O(tasks drawn), never the whole corpus
    pad = pad_id(bb.tokenizer)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(b.batch_size):
            ti, ii = draw()
            if ti not in encoded:
                encoded[ti] = baseline_examples(tasks[ti], bb.tokenizer, settings, mode)
            items.append(encoded[ti][ii])
        return assemble(items, bb.arch, pad)

    logger = TrainLogger(RunPaths.of(cfg).tb(f"baseline_{mode}"), total_steps=b.steps, enabled=True,
                         show_progress=progress, desc=f"baseline:{mode}")
    try:
        res = train_loop(model, next_batch, steps=b.steps, lr=b.lr, time_budget_s=b.time_budget_s,
                         device=str(bb.device), warmup_steps=b.warmup_steps, logger=logger, anneal_to_budget=False)
    finally:
        logger.close()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        cfg_path = tmp / "adapter_config.json"  # point the adapter at the absolute backbone path
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = str(Path(bb.path).resolve())
        cfg_path.write_text(json.dumps(acfg, indent=2))
        atomic_write_json(tmp / TRAIN_RECORD, {
            "mode": mode, "lora": [cfg.lora.r, cfg.lora.alpha, targets], "steps": res.steps,
            "seconds": round(res.seconds, 2), "batch": b.batch_size, "lr": b.lr, "seed": cfg.seed,
            "loss_first10": _mean(res.losses[:10]), "loss_last10": _mean(res.losses[-10:]), "losses": res.losses,
            "num_tasks": len(tasks), "backbone": bb.path})
        atomic_write_json(tmp / STAGE_RECORD, record)
    log(f"baseline {mode}: {res.steps} steps in {res.seconds:.0f} s, loss {_mean(res.losses[:10]):.3f} -> "
        f"{_mean(res.losses[-10:]):.3f}")
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


@stage_locked("baselines")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """Train the baselines of eval.methods (or mode `sub` alone) that are not trained yet; returns their folders."""
    modes = [sub] if sub is not None else baseline_modes(cfg)
    bad = [m for m in modes if m not in BASELINES]
    if bad:
        raise ConfigError(f"baselines: unknown mode {bad[0]!r}; expected one of {list(BASELINES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = RunPaths.of(cfg)
    out = []
    for m in modes:
        folder = paths.baseline(m)
        t0 = time.perf_counter()
        record = check_stage_record(folder, f"{STAGE} ({m})", identity(cfg, m))
        if record is None and (folder / "adapter_config.json").is_file():
            log(f"baseline {m}: skipped (trained at {folder}, hash {stage_record_hash(folder)[:12]})")
        else:
            train_baseline(cfg, m, folder, record or {}, progress=progress, log=log)
            log(f"baseline {m}: done in {time.perf_counter() - t0:.0f} s")
        out.append(folder)
    return out


def main(args: argparse.Namespace) -> int:
    run(args.cfg, (getattr(args, "extra", None) or {}).get("mode"))
    return 0
