"""Engine test worker: trains the tiny stand-in under torchrun / srun-like env / one plain process.

Each `--phase` is a JSON object (run in order in the same processes):
  arch            "llama" | "t5"                  backbone_dir  folder written by engine_standin.save_backbone
  ds_config       path or null (use_deepspeed=false)                zero_stage / persistence: overrides
  steps, lr, save_every, out (engine out_dir), resume (bool), export (dir or null)
  kill_after_save step: after saving that step, record pids and sleep (the test SIGKILLs everything)
  die_at / die_rank: that rank SIGKILLs itself after that step (peer-death test)
  check_partition: record ZeRO-3 partition facts of the backbone parameters
Rank 0 appends events to `--events` (jsonl): partition, resumed, step (loss averaged over ranks), saved, done.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from tagi_ds.errors import TagiError
from tagi_ds.run.dist import DistributedFailure, all_reduce_mean, init_distributed
from tagi_ds.train.distributed import ds_config_from_file, global_token_mean, zero3_model_context
from tagi_ds.train.engine import Engine
from tests.train import engine_standin as S


def emit(log: Path, rank: int, **event) -> None:
    if rank == 0:
        with open(log, "a") as fh:
            fh.write(json.dumps(event) + "\n")


def partition_facts(model: torch.nn.Module, world: int) -> dict:
    params = list(model.backbone.named_parameters())
    empty = all(p.numel() == 0 for _, p in params)
    ds_ok = all(getattr(p, "ds_numel", 0) > 0 for _, p in params)
    shard_ok = all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for _, p in params)
    name, p = max(params, key=lambda kv: kv[1].ds_numel)
    return {"event": "partition", "n_params": len(params), "all_empty": empty, "ds_numel_positive": ds_ok,
            "shards_ok": shard_ok, "example": {"name": name, "ds_numel": p.ds_numel, "numel": p.numel(),
                                               "shard": p.ds_tensor.numel(), "status": str(p.ds_status)}}


def run_phase(ph: dict, log: Path, timeout_s: float) -> None:
    use_ds = ph.get("ds_config") is not None
    info = init_distributed(timeout_s, use_deepspeed=use_ds) if use_ds else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    arch, steps, lr = ph["arch"], ph["steps"], ph.get("lr", 1e-2)
    mb = S.GLOBAL_BATCH // world
    ds = None
    if use_ds:
        ds = ds_config_from_file(ph["ds_config"], micro_batch=mb, grad_accum=1, lr=lr, weight_decay=0.0,
                                 grad_clip=1.0, dtype=ph.get("dtype", "float32"), zero_stage=ph.get("zero_stage"),
                                 param_persistence_threshold=ph.get("persistence"), world_size=world)
        with zero3_model_context(ds):
            backbone = S.model_class(arch).from_pretrained(ph["backbone_dir"])
    else:
        backbone = S.model_class(arch).from_pretrained(ph["backbone_dir"])
    model = S.StandIn(arch, backbone)
    eng = Engine(model, ds, lr=lr, warmup_steps=2, total_steps=steps, schedule="constant", weight_decay=0.0,
                 grad_clip=1.0, use_deepspeed=use_ds, out_dir=ph["out"], seed=0, log_dir=ph.get("log_dir"),
                 timeout_s=timeout_s, show_progress=False)
    if ph.get("check_partition"):
        emit(log, rank, **partition_facts(eng.module, world))
    start = 0
    if ph.get("resume"):
        progress = eng.resume_latest()
        if progress is not None:
            start = progress["data_position"]
            emit(log, rank, event="resumed", step=start, global_step=eng.global_step)
    for step in range(start, steps):
        batch = S.make_batch(arch, step, rank, world)
        loss_sum, n_tok = eng(batch)
        loss = global_token_mean(loss_sum, n_tok)
        eng.backward(loss)
        eng.step(tokens=int(n_tok))
        value = all_reduce_mean(loss.detach())
        emit(log, rank, event="step", phase=ph.get("name"), step=step + 1, loss=value,
             global_step=eng.global_step, world=world)
        eng.log_scalars(step + 1, {"loss": value})
        if ph.get("die_at") == step + 1 and rank == ph.get("die_rank", 1):
            Path(ph["out"], "died.json").write_text(json.dumps({"rank": rank, "time": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)
        if ph.get("save_every") and (step + 1) % ph["save_every"] == 0:
            eng.save(step + 1, {"data_position": step + 1})
            emit(log, rank, event="saved", step=step + 1)
            if ph.get("kill_after_save") == step + 1:
                Path(ph["out"], f"pid_rank{rank}").write_text(str(os.getpid()))
                time.sleep(600)  # the test kills us here, after a complete checkpoint
    if ph.get("export"):
        eng.export_trainable(ph["export"], {"arch": arch, "targets": model.targets})
        with torch.no_grad():  # reference outputs of the trained module, for the reload-without-DeepSpeed test
            ab = eng.module.hyper(torch.arange(S.N_TASKS))  # every rank: ZeRO-3 gathers the weights
            loss_sum, _ = eng(S.make_batch(arch, 0, rank, world))
            total = all_reduce_mean(loss_sum) * world
        if rank == 0:
            torch.save({"ab": [(a.clone(), b.clone()) for a, b in ab], "loss_sum_step0": total},
                       Path(ph["export"]).parent / "export_reference.pt")
    eng.close()
    emit(log, rank, event="done", phase=ph.get("name"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", action="append", required=True, help="JSON object, see the module docstring")
    ap.add_argument("--events", required=True)
    ap.add_argument("--coll-timeout", type=float, default=120.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        for text in args.phase:
            run_phase(json.loads(text), Path(args.events), args.coll_timeout)
    except DistributedFailure:  # collective_guard already printed the explanation
        return 3
    except TagiError as e:
        print(f"ds_worker: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
