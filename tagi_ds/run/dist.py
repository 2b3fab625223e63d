"""The process group every multi-process stage shares: who am I (rank, world size), wait for the others (barrier),
and collectives that fail with a clear message instead of hanging. Training, evaluation and the pipeline sit on it.

Works under torchrun, the deepspeed launcher, Slurm `srun`, and as one plain process with no launcher. DeepSpeed is
imported only when a stage asks for it (its own init); evaluation and the pipeline use torch.distributed alone.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


class DistributedFailure(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or the network broke. Not a user error."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm" or "single"


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        with collective_guard("barrier"):
            dist.barrier()


# ------------------------------------------------------------------------------------------ process group
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ("gpu[03-05,07],cpu1" → "gpu03"); `scontrol` when present, else parsed."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _environment_from_slurm() -> bool:
    """Translate an `srun` step's variables into the RANK/WORLD_SIZE/... that torch.distributed reads."""
    if "SLURM_PROCID" not in os.environ:
        return False
    # SLURM_STEP_NUM_TASKS is set by srun only; a process started directly in a batch script sees SLURM_NTASKS of the
    # whole allocation and must not wait for peers that will never come.
    ntasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if ntasks is None:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = ntasks
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        os.environ["MASTER_ADDR"] = _first_slurm_host(nodes)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    return True


def init_distributed(timeout_s: float = 600.0, *, use_deepspeed: bool = True) -> DistInfo:
    """Create the process group once (idempotent) and return this process's place in it.

    torchrun / deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* are already set. Slurm srun: derived from
    SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID. No launcher: one process, RANK=0 WORLD_SIZE=1 and a free
    port (else DeepSpeed falls back to MPI discovery and fails on a missing mpi4py). Backend: nccl on CUDA, gloo on
    CPU. `timeout_s` bounds every collective, so a rank whose peer died fails instead of hanging.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun"
    elif _environment_from_slurm():
        launcher = "slurm"
    else:
        launcher = "single"
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    on_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=dist.get_backend(), launcher=launcher)


_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
               "socket", "peer", "connection refused", "distbackenderror")


@contextlib.contextmanager
def collective_guard(what: str) -> Iterator[None]:
    """Turn a failed collective into DistributedFailure with a message that says what most likely happened."""
    try:
        yield
    except DistributedFailure:
        raise
    except (RuntimeError, OSError) as e:  # torch.distributed.DistBackendError is a RuntimeError
        text = f"{type(e).__name__}: {e}"
        if world_size() <= 1 or not any(s in text.lower() for s in _PEER_SIGNS):
            raise
        msg = (f"rank {rank()}/{world_size()}: a collective failed during {what}; another rank most likely died "
               f"or hung (see its log), or the collective timeout passed. Cause: {text.splitlines()[0][:500]}")
        print(f"[tagi-ds] {msg}", file=sys.stderr, flush=True)
        raise DistributedFailure(msg) from e



def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (for logging); the value itself on one process."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(()).clone()
    w = world_size()
    if w > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        with collective_guard("logging all-reduce"):
            dist.all_reduce(t)
    return float(t.item()) / w



def launched_ranks() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE, srun's SLURM_STEP_NUM_TASKS), before any
    process group exists; 1 for a plain process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        return int(os.environ["SLURM_STEP_NUM_TASKS"])
    return 1


def join_ranks(timeout_s: float = 600.0) -> tuple[int, int]:
    """(rank, world size) of a stage whose ranks split independent units (teachers, cache shards, evaluation
    shards): the process group is created (gloo/nccl, no DeepSpeed) only when the launcher started several."""
    if launched_ranks() > 1 and not dist.is_initialized():
        init_distributed(timeout_s, use_deepspeed=False)
    return rank(), world_size()


def my_share(items: list, of_rank: int | None = None, of_world: int | None = None) -> list:
    """This rank's items: every world-size-th one from its rank (a deterministic, disjoint split)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if of_world is None else of_world
    return items[r::w]
