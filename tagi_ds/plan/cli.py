"""`tagi-ds plan --config X --nodes N --gpus-per-node G [--stage S|all] [--json] [--gpu-mem GiB] [--host-mem GiB]
[--throughput TFLOPS] [--mem-bandwidth GBS] [key=value ...]`: size a run before it is queued (no GPU, no weights)."""
from __future__ import annotations

import argparse
import json

from .report import (DEFAULT_GPU_MEM_GIB, DEFAULT_HOST_MEM_GIB, DEFAULT_MEM_BANDWIDTH_GBS,
                     DEFAULT_THROUGHPUT_TFLOPS, STAGES, format_plan, make_plan)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host memory is split among them)")
    p.add_argument("--stage", default="all", choices=["all", *STAGES],
                   help="one stage (its parts in detail) or all the stages the config runs")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--detail", action="store_true", help="print every stage's parts, phase by phase")
    p.add_argument("--gpu-mem", type=float, default=DEFAULT_GPU_MEM_GIB, help="GiB per GPU (default 80)")
    p.add_argument("--host-mem", type=float, default=DEFAULT_HOST_MEM_GIB,
                   help="GiB of host memory per node (default 1024); each rank / array element gets host / G")
    p.add_argument("--throughput", type=float, default=DEFAULT_THROUGHPUT_TFLOPS,
                   help="sustained TFLOP/s per GPU for the time estimate (default 100: about a third of an A100's "
                        "bf16 peak; ~250-300 on an H100)")
    p.add_argument("--mem-bandwidth", type=float, default=DEFAULT_MEM_BANDWIDTH_GBS,
                   help="GB/s per GPU that greedy decoding reads the weights at (default 1500)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.sni_dir=/data/sni")


def main(args: argparse.Namespace) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.stage, gpu_mem_gib=args.gpu_mem,
                     host_mem_gib=args.host_mem, throughput_tflops=args.throughput,
                     mem_bandwidth_gbs=args.mem_bandwidth)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan, True if args.detail else None))
    return 0
