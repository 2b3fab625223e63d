"""Host memory of greedy decoding on CPU with exact batch widths vs 64-token width buckets, side by side (issue #17).

    PYTHONPATH=. python bench/eval_width_buckets.py              # ~1 minute on one core
    PYTHONPATH=. python bench/eval_width_buckets.py --batches 400 --dtype float32

Each mode runs in a fresh process (the caches under test are process-wide): a random bf16 T5 (the scale configs'
dtype) decodes `--batches` batches of prompts whose lengths are drawn from [1, --max-len] through the real decoder
(run/decode.decode_prompts), with `width_multiple=1` (exact widths: the code before) or collate.WIDTH_BUCKET. On CPU,
bf16 matmuls keep one compiled oneDNN primitive per shape (oneDNN's primitive cache and ideep's LRU cache, 1,024
entries each) and CPU flash attention one brgemm kernel per shape (torch's cache, unbounded), so host RSS grows with
the number of distinct widths met. Printed: RSS after a warm-up of 20 batches and at the end, the growth per 100
batches, and the ratio of the two modes' final RSS. Measured (2 cores shared, bf16, defaults): exact 499 -> 784 MiB
(+158 MiB / 100 batches), bucketed 457 -> 450 MiB (flat), 1.74x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(args: argparse.Namespace) -> dict:
    import random

    import torch

    from tagi_ds.data.collate import WIDTH_BUCKET
    from tagi_ds.modeling.tiny import build_from_config, tiny_t5_config
    from tagi_ds.run.decode import decode_prompts

    torch.set_num_threads(1)
    cfg = tiny_t5_config(vocab_size=1000, d_model=64, num_layers=4, num_heads=2, d_ff=128,
                         feed_forward_proj="gated-gelu")
    model = build_from_config(cfg, seed=0, frozen=True).to(getattr(torch, args.dtype)).eval()

    class Tok:  # decode_prompts reads the pad/eos ids and decodes the answers
        pad_token_id, eos_token_id = 0, 1

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    rng = random.Random(0)
    multiple = WIDTH_BUCKET if args.mode == "bucketed" else 1
    at_warmup = None
    for b in range(args.batches):
        rows = [[rng.randrange(2, 1000) for _ in range(rng.randint(1, args.max_len))] for _ in range(args.rows)]
        decode_prompts(model, Tok(), "t5", rows, device="cpu", max_new_tokens=2, batch_size=args.rows,
                       width_multiple=multiple)
        if b + 1 == WARMUP:
            at_warmup = rss_mib()
    return {"warm": at_warmup, "end": rss_mib()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rows", type=int, default=4, help="prompts per batch")
    ap.add_argument("--max-len", type=int, default=512, help="prompt lengths are drawn from [1, max-len]")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--mode", choices=["exact", "bucketed"], help=argparse.SUPPRESS)  # the worker process
    args = ap.parse_args()
    if args.batches <= WARMUP:
        ap.error(f"--batches must be more than the {WARMUP} warm-up batches")
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    res = {}
    for mode in ("exact", "bucketed"):
        argv = [sys.executable, __file__, "--mode", mode, "--batches", str(args.batches), "--rows", str(args.rows),
                "--max-len", str(args.max_len), "--dtype", args.dtype]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    per = args.batches - WARMUP
    print(f"{args.batches} batches of {args.rows} prompts of 1..{args.max_len} tokens, {args.dtype}, greedy 2 tokens")
    print(f"{'mode':<10}{'RSS warm MiB':>14}{'RSS end MiB':>13}{'growth MiB / 100 batches':>26}")
    growth = {}
    for mode, r in res.items():
        growth[mode] = (r["end"] - r["warm"]) * 100 / per
        print(f"{mode:<10}{r['warm']:>14.1f}{r['end']:>13.1f}{growth[mode]:>26.2f}")
    print(f"RSS at the end, exact / bucketed: {res['exact']['end'] / res['bucketed']['end']:.2f}x; growth after the "
          f"warm-up {growth['exact'] - growth['bucketed']:+.1f} MiB / 100 batches with exact widths")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
