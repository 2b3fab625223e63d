"""Benchmark: what ZeRO-3 keeps of the frozen backbone per rank, DeepSpeed's fixed sizes vs sizes from the model,
side by side in one run on 2 gloo ranks (CPU), through the real stage (`tagi-ds pretrain`, a few steps).

    PYTHONPATH=. python bench/zero3_partition.py                     # wide LLaMA: hidden 512, 8 layers (~2 min)
    PYTHONPATH=. python bench/zero3_partition.py --hidden 64 --layers 2 --ffn 176   # the tiny demo's shape

Each run's stage measures its first two optimizer steps (train/zero3_probe.py: a sample after every parameter fetch) and
records in summary.json the peak bytes of backbone weights a rank held and what stayed whole after the step, as
fractions of the whole model (2 ranks: 0.5 is a rank's shard alone).

  fixed   the values ds_configs/zero3.json shipped before: persistence threshold 1e5, prefetch bucket 5e7, max live
          1e9, max reuse 1e9, reduce bucket 5e7
  auto    ds_configs/zero3.json now: "auto", filled from the backbone (train/distributed.ModelSizes)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

FIXED = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
         "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000,
         "stage3_max_reuse_distance": 1_000_000_000}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    return ap.parse_args(argv)


def build_backbone(out: Path, args) -> Path:
    """A random LLaMA of the given shape with the demo's tokenizer (its vocabulary), saved like a hub folder."""
    from transformers import AutoTokenizer

    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config
    from tagi_ds.run.backbone_recipe import ASSET_DIR

    tok = AutoTokenizer.from_pretrained(ASSET_DIR)
    config = tiny_llama_config(vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.heads, intermediate_size=args.ffn)
    build_from_config(config, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def ds_config(work: Path, name: str, sizes: dict | None) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    if sizes is not None:
        cfg["zero_optimization"].update(sizes)
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(work: Path, name: str, backbone: Path, ds: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tagi_ds.cli", "pretrain", "--config", str(REPO / "configs" / "tiny.yaml"), f"runs_dir={work}",
           f"name={name}", f"backbone.name_or_path={backbone}", "distributed.use_deepspeed=true",
           f"distributed.ds_config={ds}", f"pretrain.steps={steps}", "pretrain.checkpoint_every=0",
           "pretrain.micro_batch_size=4", "pretrain.time_budget_s=null", "threads=1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    summary = json.loads((work / name / "pretrain" / "summary.json").read_text())
    return summary["backbone_partition"]


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="zero3_partition_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        backbone = build_backbone(work / "backbone", args)
        rows = {}
        for name, sizes in (("fixed", FIXED), ("auto", None)):
            rows[name] = run_pretrain(work, name, backbone, ds_config(work, name, sizes), args.steps)
        full = rows["auto"]["first_steps"]["full_bytes"]
        print(f"\nLLaMA hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}: {full / 2 ** 20:.1f} MiB of "
              f"backbone weights; 2 gloo ranks, first two optimizer steps of `tagi-ds pretrain`\n")
        print("| sizes | peak per rank (x model) | whole after the step (x model) | tensors |")
        print("|---|---|---|---|")
        for name, part in rows.items():
            f = part["first_steps"]
            print(f"| {name} | {f['max_rank_peak_fraction']:.3f} | {f['max_rank_at_rest_fraction']:.3f} | "
                  f"{part['n_params']} |")
        ratio = rows["auto"]["first_steps"]["max_rank_peak_fraction"] / rows["fixed"]["first_steps"][
            "max_rank_peak_fraction"]
        print(f"\npeak auto / fixed: {ratio:.3f}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
