"""Multi-node launch: the exact `torchrun` command each node runs, rendered in one testable place.

`slurm/train_multinode.sbatch` starts one task per node with `srun`; each task runs
`python -m tagi_ds.train.launch --node-rank $SLURM_NODEID ...`, which renders the same command list a dry run
prints and `exec`s its own line. So what `--dry-run` shows is byte for byte what runs.

Rendezvous: torchrun's c10d backend with its store on the first host of the allocation (the order of
`scontrol show hostnames "$SLURM_JOB_NODELIST"`), on a port derived from the job id so two jobs whose first host is
the same node do not collide. `is_host=1` is set on node 0 only, so the store starts there even when the hostname
Slurm gives differs from the one the machine reports. With c10d, torchrun hands out global ranks in join order:
node 0 hosts the store, but its processes are not guaranteed to be ranks 0..G-1 (nothing in tagi-ds relies on it).
Restarts are left to Slurm (`--requeue` + `resume: auto`), hence `--max_restarts=0`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, TagiError

PORT_BASE = 29500
# Ports 29500..32499: below Linux's default ephemeral range (32768+), so an outgoing connection never holds them.
PORT_SPAN = 3000
LAUNCHER = (sys.executable, "-m", "torch.distributed.run")  # torchrun, with this interpreter
STAGES = ("pretrain", "finetune", "pipeline", "teacher", "cache-logits", "evaluate")


def port_for(number: int | str, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """A TCP port from a job id or array index: base + number % span."""
    try:
        n = int(number)
    except (TypeError, ValueError):
        raise ConfigError(f"cannot derive a port from {number!r}: expected an integer job id or array index") from None
    return base + n % span


def parse_nodelist(text: str | Sequence[str]) -> list[str]:
    """'n1 n2' / 'n1,n2' / a list → ['n1', 'n2'] (Slurm's compressed form must be expanded by scontrol first)."""
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t) for t in text]
    nodes = [n for n in items if n]
    for n in nodes:
        if "[" in n:
            raise ConfigError(f"node list entry '{n}' is in Slurm's compressed form; expand it with "
                              f"`scontrol show hostnames \"$SLURM_JOB_NODELIST\"`")
    if not nodes:
        raise ConfigError("empty node list: expected at least one host name")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"node list has duplicates: {' '.join(nodes)}")
    return nodes


def _resume_overrides(stage: str) -> list[str]:
    """Requeue safety: a requeued job must pick up its latest checkpoint, whatever the YAML says."""
    if stage in ("pretrain", "finetune"):
        return [f"{stage}.resume=auto"]
    if stage == "pipeline":
        return ["pretrain.resume=auto", "finetune.resume=auto"]
    return []


def render_node_commands(nodes: Sequence[str], gpus_per_node: int, job_id: int | str, config: str,
                         ds_config: str, stage: str, *, overrides: Sequence[str] = (),
                         launcher: Sequence[str] = ("torchrun",)) -> list[str]:
    """One torchrun command per node (index = node rank), all meeting at a c10d rendezvous on nodes[0].

    `launcher` is the torchrun argv prefix; the CLI uses `<this python> -m torch.distributed.run` so the node runs
    the same interpreter (venv) as the batch script, whatever is on PATH.
    """
    nodes = parse_nodelist(nodes)
    if gpus_per_node < 1:
        raise ConfigError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    if stage not in STAGES:
        raise ConfigError(f"stage '{stage}' cannot be launched on several nodes; expected one of: {', '.join(STAGES)}")
    port = port_for(job_id)
    endpoint = f"{nodes[0]}:{port}"
    tail = ["-m", "tagi_ds.cli", stage, "--config", config, f"distributed.ds_config={ds_config}",
            *_resume_overrides(stage), *overrides]
    cmds = []
    for rank, _host in enumerate(nodes):
        argv = [
            *launcher,
            f"--nnodes={len(nodes)}",
            f"--nproc_per_node={gpus_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={job_id}",
            f"--rdzv_conf=is_host={1 if rank == 0 else 0}",
            "--max_restarts=0",
            *tail,
        ]
        cmds.append(shlex.join(argv))
    return cmds


def _node_rank(text: str, n_nodes: int) -> int:
    """`--node-rank` is an integer, or 'slurm' for $SLURM_NODEID (the node's index in the job's node list)."""
    raw = os.environ.get("SLURM_NODEID") if text == "slurm" else text
    if raw is None:
        raise ConfigError("--node-rank slurm: SLURM_NODEID is not set (not inside an srun step)")
    try:
        rank = int(raw)
    except ValueError:
        raise ConfigError(f"--node-rank must be an integer or 'slurm', got {text!r}") from None
    if not 0 <= rank < n_nodes:
        raise ConfigError(f"--node-rank {rank} is out of range: valid 0-{n_nodes - 1}")
    return rank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tagi_ds.train.launch",
                                description="render (and on a node, exec) the per-node torchrun commands")
    p.add_argument("--nodes", required=True, help="host names, space or comma separated (expanded node list)")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--job-id", required=True)
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON")
    p.add_argument("--stage", default="finetune", help=f"one of {', '.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print every node's command and the environment; run nothing")
    p.add_argument("--node-rank", default=None, help="exec this node's command: an index, or 'slurm' for $SLURM_NODEID")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides passed to the stage")
    args = p.parse_args(argv)
    try:
        for label, path in (("--config", args.config), ("--ds-config", args.ds_config)):
            if not Path(path).is_file():
                raise ConfigError(f"{label} {path}: file not found (paths are relative to the repository root)")
        cmds = render_node_commands(args.nodes, args.gpus_per_node, args.job_id, args.config, args.ds_config,
                                    args.stage, overrides=args.overrides, launcher=LAUNCHER)
        nodes = parse_nodelist(args.nodes)
        if args.dry_run or args.node_rank is None:
            print(f"# rendezvous: c10d on {nodes[0]}:{port_for(args.job_id)} "
                  f"({len(nodes)} nodes x {args.gpus_per_node} GPUs = {len(nodes) * args.gpus_per_node} ranks)")
            for rank, (host, cmd) in enumerate(zip(nodes, cmds)):
                print(f"# node {rank} ({host})")
                print(cmd)
            return 0
        rank = _node_rank(args.node_rank, len(nodes))
        cmd = shlex.split(cmds[rank])
        print(f"[launch] node {rank} ({nodes[rank]}): {cmds[rank]}", flush=True)
        os.execvp(cmd[0], cmd)
    except TagiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0  # pragma: no cover (execvp does not return)


if __name__ == "__main__":
    sys.exit(main())
