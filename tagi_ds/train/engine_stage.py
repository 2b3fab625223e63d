"""The one training loop every engine stage runs (the hypernetwork's pretrain and finetune, the multitask baselines),
by composition: a stage builds a `StageSpec` (its module, its data, its folders, identity and export) around an
`EngineSetup` (process group, DeepSpeed config, tokenizer, the frozen backbone), and `train_stage` runs it:

    setup = setup_backbone(cfg, micro_batch=..., loop=cfg.finetune)   # ZeRO-3: the backbone partitioned at load
    spec = StageSpec(name, out_dir, tb_dir, loop, record, batches, module, export, ...)
    out = train_stage(setup, spec)      # engine, resume (any world size), token-weighted loop, logs, SIGTERM,
                                        # checkpoints, export, summary.json

The module runs inside the engine's forward, so DeepSpeed sees one module call per micro batch; it returns (sum of
token losses, token count, {term: detached sum}) for this rank's micro batch, divided by the GLOBAL token count
(`global_token_mean`): 1 process and N ranks optimise the same objective. The data is read by global position
(`BatchSource.batch(g)`): rank r of W takes positions r, r + W, ..., so a position is a property of the data, and a
run resumes at it on any world size. A rank asked to stop (SIGTERM / SIGUSR1: run/signals.py) makes every rank
checkpoint at the next optimizer step and exit 75.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..config import LoopConfig, dump_yaml
from ..data.collate import pad_id
from ..errors import TagiError
from ..io_utils import atomic_write_json, atomic_write_text
from ..run.backbone import resolve_device
from ..run.backbone_recipe import resolve_backbone_path
from ..run.dist import all_reduce_mean, collective_guard, init_distributed, rank, world_size
from ..run.identity import write_stage_record
from ..run.signals import StopSignals, Stopped
from .distributed import (ds_config_from_file, global_token_mean, model_sizes, release_zero3_context,
                          zero3_model_context)
from .engine import Engine, seed_everything
from .zero3_probe import BackboneBytes, measure_backbone_bytes, partition_facts

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MAX_NONFINITE_IN_A_ROW = 5  # skipped nan/inf batches in a row before the run stops with an error


class BatchSource(Protocol):
    """A stage's data: the micro batch at a global position (a pure function of the seed and the position), an
    object with `.to(device)`."""

    def batch(self, position: int) -> Any: ...


@dataclass
class EngineSetup:
    """What every engine stage starts from."""

    cfg: Any
    device: torch.device
    tokenizer: Any
    backbone_path: str
    arch: str
    backbone: nn.Module
    ds_config: Optional[dict]
    started: float = 0.0  # perf_counter at the start of the setup (time to the first step is measured from here)

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


def resolve_ds_config(path: str) -> Path:
    """A relative ds config path is looked up in the working directory, then in the repository."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).is_file() else p


def setup_backbone(cfg, *, micro_batch: int, loop: LoopConfig) -> EngineSetup:
    """Distributed init and the DeepSpeed config (its "auto" values from the loop), tokenizer, the frozen backbone
    (partitioned at construction under ZeRO-3), all seeded."""
    from transformers import AutoConfig, AutoTokenizer

    from ..kernels.dispatch import choose_attn_implementation
    from ..modeling.backbone import detect_arch, load_backbone

    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed)
    ds = None
    b = cfg.backbone
    path = str(resolve_backbone_path(cfg))
    model_config = AutoConfig.from_pretrained(path)
    arch = b.arch if b.arch != "auto" else detect_arch(model_config)
    if cfg.distributed.use_deepspeed:
        info = init_distributed(cfg.distributed.timeout_s)
        ds = ds_config_from_file(resolve_ds_config(cfg.distributed.ds_config), micro_batch=micro_batch,
                                 grad_accum=loop.grad_accum, lr=loop.lr, weight_decay=loop.weight_decay,
                                 grad_clip=loop.grad_clip, dtype=cfg.backbone.dtype,
                                 zero_stage=cfg.distributed.zero_stage,
                                 param_persistence_threshold=cfg.distributed.param_persistence_threshold,
                                 world_size=info.world_size, sizes=model_sizes(model_config, arch))
    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(b.tokenizer or path)
    attn = b.attn_implementation or choose_attn_implementation(arch, device)
    with zero3_model_context(ds) if ds is not None else contextlib.nullcontext():
        backbone, arch = load_backbone(path, arch, b.dtype, attn)
    return EngineSetup(cfg, device, tokenizer, path, arch, backbone, ds, started)


@dataclass
class StageSpec:
    """What one engine stage gives the loop."""

    name: str                       # "pretrain" / "finetune" / "baselines"
    out_dir: Path
    tb_dir: Path
    loop: LoopConfig
    record: Optional[dict]          # run.identity.check_stage_record's result, checked before anything loaded
    batches: BatchSource
    module: nn.Module               # forward(batch) -> (sum of token losses, token count, {term: detached sum})
    export: Callable[[nn.Module, int], Optional[Path]]  # (module, final step) -> the published folder (rank 0)
    variant: Optional[str] = None
    summary: dict = field(default_factory=dict)  # stage facts for summary.json (tasks, terms, init_from, ...)
    close: Optional[Callable[[dict], None]] = None  # releases the stage's helpers (threads); may add to the summary
    lr_scale_of: Optional[Callable[[str], float]] = None  # per-parameter lr multiplier (the hypernetwork's heads)


def _global_means(sums: dict[str, float], n_tokens: float) -> dict[str, float]:
    """Token means over all ranks of each term (one all-reduce of [n, sums...])."""
    names = sorted(sums)
    t = torch.tensor([n_tokens] + [sums[k] for k in names], dtype=torch.float64)
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        with collective_guard("loss-term all-reduce"):
            dist.all_reduce(t)
        t = t.cpu()
    n = max(float(t[0]), 1.0)
    return {"tokens": float(t[0]), **{k: float(v) / n for k, v in zip(names, t[1:].tolist())}}


def _out_of_time(t_start: float, budget: float) -> bool:
    # Every rank must stop at the same step (ZeRO-3 collectives): rank 0's clock decides.
    flag = torch.tensor([1.0 if time.perf_counter() - t_start >= budget else 0.0])
    if world_size() > 1:
        with collective_guard("time-budget broadcast"):
            dist.broadcast(flag, src=0)
    return bool(flag.item())


def _log(engine: Engine, out_dir: Path, step: int, means: dict[str, float]) -> None:
    engine.log_scalars(step, {k: v for k, v in means.items() if k != "tokens"})
    if rank() == 0:
        with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:  # a log stream, appended
            fh.write(json.dumps({"step": step, "lr": engine.lr, **means}) + "\n")


def train_stage(setup: EngineSetup, spec: StageSpec, *, on_checkpoint: Optional[Callable[[int], None]] = None,
                show_progress: bool = True) -> Optional[Path]:
    """Run an engine stage to its last step and publish its export; returns the export folder on rank 0.
    Raises run.signals.Stopped (after a checkpoint) when the process was asked to stop."""
    cfg, loop, module = setup.cfg, spec.loop, spec.module
    summary: dict[str, Any] = {"stage": spec.name, "variant": spec.variant, **spec.summary,
                               "world_size": world_size()}
    if not cfg.distributed.use_deepspeed:
        module.to(setup.device)
    engine = Engine(module, setup.ds_config, lr=loop.lr, warmup_steps=loop.warmup_steps, total_steps=loop.steps,
                    schedule=loop.schedule, weight_decay=loop.weight_decay, grad_clip=loop.grad_clip,
                    use_deepspeed=cfg.distributed.use_deepspeed, out_dir=spec.out_dir, seed=cfg.seed,
                    log_dir=spec.tb_dir, grad_accum=loop.grad_accum, keep_checkpoints=loop.keep_checkpoints,
                    timeout_s=cfg.distributed.timeout_s, show_progress=show_progress,
                    lr_scale_of=spec.lr_scale_of)
    try:
        summary["backbone_partition"] = partition_facts(setup.backbone)
        position = 0
        if loop.resume == "auto":
            progress = engine.resume_latest()
            if progress is not None:
                summary["resumed_from"] = int(progress["step"])
                position = int(progress.get("data_position", engine.global_step * engine.grad_accum))
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        if rank() == 0:
            write_stage_record(spec.out_dir, spec.record)
            atomic_write_text(spec.out_dir / "config.yaml", dump_yaml(cfg))
        with StopSignals() as stop:
            position = _train(engine, module, spec, setup, summary, on_checkpoint, stop, position)
        if spec.close is not None:
            spec.close(summary)
        step = engine.global_step
        if step > 0:
            _checkpoint(engine, spec, step, position, on_checkpoint)
        out = spec.export(module, step)
        if rank() == 0:
            atomic_write_json(spec.out_dir / SUMMARY_FILE, summary)
        return out
    finally:
        engine.close()
        release_zero3_context()


def _record_backbone_bytes(summary: dict, measured: BackboneBytes, stage: str) -> None:
    """Peak and at-rest backbone bytes of the first steps, as fractions of the whole model, largest over ranks."""
    facts = measured.facts()
    peak = torch.tensor([float(measured.peak), float(measured.at_rest)], dtype=torch.float64)
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            peak = peak.cuda()
        with collective_guard("backbone-bytes all-reduce"):
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak = peak.cpu()
    facts.update(max_rank_peak_fraction=round(float(peak[0]) / measured.full, 4),
                 max_rank_at_rest_fraction=round(float(peak[1]) / measured.full, 4))
    summary["backbone_partition"].update(first_steps=facts)
    if rank() == 0:
        print(f"{stage}: ZeRO-3 backbone per rank in steps 1-2: peak {facts['max_rank_peak_fraction']:.3f} of the "
              f"model ({measured.full / 2 ** 20:.1f} MiB whole), {facts['max_rank_at_rest_fraction']:.3f} at rest",
              flush=True)


def _checkpoint(engine: Engine, spec: StageSpec, step: int, position: int,
                on_checkpoint: Optional[Callable[[int], None]]) -> None:
    """A resumable checkpoint; `position` is the GLOBAL data position of the next micro batch (any world size)."""
    engine.save(step, {"data_position": position, "stage": spec.name, "variant": spec.variant})
    if on_checkpoint is not None:
        on_checkpoint(step)


def _train(engine: Engine, module: nn.Module, spec: StageSpec, setup: EngineSetup, summary: dict,
           on_checkpoint: Optional[Callable[[int], None]], stop: StopSignals, position: int) -> int:
    """The token-weighted loop from the engine's (resumed) step to `loop.steps`; returns the next global position.
    Rank r reads global positions position + r, + W, ...: batches are a pure function of (seed, position)."""
    loop = spec.loop
    W, r = world_size(), rank()
    sums: dict[str, float] = {}
    n_tok = 0.0
    t_start = time.perf_counter()
    module.train()
    _ = engine.logger  # create the bar / writer now, so it starts at the (resumed) step, not one step late
    last: dict[str, float] = {}
    nonfinite_in_a_row = 0
    # ZeRO-3: what the backbone really occupies on this rank, measured over the first two optimizer steps
    # (zero3_probe): DeepSpeed records its fetch trace in the first and prefetches by it from the second on.
    probe, probe_until = contextlib.ExitStack(), min(engine.global_step + 2, loop.steps)
    measured = probe.enter_context(measure_backbone_bytes(setup.backbone)) if engine.global_step < loop.steps else None
    while engine.global_step < loop.steps:
        batch = spec.batches.batch(position + r).to(setup.device)
        position += W
        total, n, terms = engine(batch)
        loss = global_token_mean(total, n)
        if all_reduce_mean(1.0 if bool(torch.isfinite(loss.detach())) else 0.0) < 1.0:
            # A nan/inf loss on any rank: every rank drops this micro batch (no backward, no step) and moves on to
            # the next one; only a run of them is an error (the weights themselves are then broken).
            nonfinite_in_a_row += 1
            summary["skipped_nonfinite_batches"] = summary.get("skipped_nonfinite_batches", 0) + 1
            if rank() == 0:
                print(f"{spec.name}: non-finite loss ({float(loss.detach())}) at step {engine.global_step + 1}; "
                      f"batch skipped ({nonfinite_in_a_row} in a row)", flush=True)
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise TagiError(f"{spec.name}: the loss was non-finite on {nonfinite_in_a_row} batches in a row at "
                                f"step {engine.global_step + 1}; lower the lr (now {loop.lr}) or check the data "
                                f"(last checkpoint in {spec.out_dir / 'checkpoints'})")
            continue
        nonfinite_in_a_row = 0
        engine.backward(loss)
        n_local = float(n)
        n_tok += n_local
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if not engine.step(tokens=int(n_local)):
            continue
        if measured is not None and engine.global_step >= probe_until:
            probe.close()
            _record_backbone_bytes(summary, measured, spec.name)
            measured = None
        step = engine.global_step
        if "time_to_first_step_s" not in summary:
            summary["time_to_first_step_s"] = round(time.perf_counter() - setup.started, 3)
        if step % max(1, loop.log_every) == 0 or step == loop.steps:
            last = _global_means(sums, n_tok)
            if not math.isfinite(last["loss"]):
                raise TagiError(f"{spec.name}: the loss became {last['loss']} at step {step}; lower the lr or check "
                                f"the data (last checkpoint in {spec.out_dir / 'checkpoints'})")
            _log(engine, spec.out_dir, step, last)
        sums, n_tok = {}, 0.0
        if step < loop.steps and stop.should_stop():
            _checkpoint(engine, spec, step, position, on_checkpoint)
            raise Stopped(f"{spec.name}: {stop.requested or 'another rank asked to stop'}: checkpoint at step {step} "
                          f"in {spec.out_dir / 'checkpoints'}; rerun the same command to resume from it")
        if loop.checkpoint_every > 0 and step % loop.checkpoint_every == 0 and step < loop.steps:
            _checkpoint(engine, spec, step, position, on_checkpoint)
        if loop.time_budget_s is not None and _out_of_time(t_start, loop.time_budget_s):
            summary["stopped_by_time_budget"] = step
            break
    probe.close()
    summary.update(final_step=engine.global_step, last_logged=last, train_seconds=time.perf_counter() - t_start,
                   skipped_nonfinite_updates=getattr(engine, "skipped_updates", 0))
    return position
