"""`tagi-ds inspect-cache DIR`: what a teacher logit cache holds, per task and in total.

Per task: the cache mode and its width (k, or N draws), instances, label tokens, bytes per token (the per-position
arrays: log-probs, ids, and the counts / threshold of the sampled modes; offsets and manifests count in the total
size only), and the mean kept mass (the teacher probability the cached ids cover, exp(logsumexp(logprobs)): for a
top-k cache low values mean k is too small, above all for the "renormalize" KL; for the sampled modes it only says
how much of the teacher the drawn ids hold, the estimate stays unbiased).
DIR is a cache root (one sub-folder per task) or a single shard folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactMismatchError
from .logit_cache import MANIFEST_FILE, CacheShardReader, data_files


def shard_stats(reader: CacheShardReader, chunk_rows: int = 1 << 16) -> dict[str, Any]:
    tokens = reader.tokens
    files = data_files(reader.mode, reader.vocab_size)
    nbytes = sum((reader.dir / f).stat().st_size for f in (*files, MANIFEST_FILE))
    row_bytes = sum((reader.dir / f).stat().st_size for f in files[:-1])  # per-token payload (not the offsets)
    mass_sum = 0.0
    for s in range(0, tokens, chunk_rows):  # memory-mapped, chunked: flat memory on big shards
        lp = np.asarray(reader.logprobs[s:s + chunk_rows], dtype=np.float64)  # (c, k)
        if "counts" in reader.arrays:  # padding slots of the sampled mode hold log p = 0: leave them out
            lp = np.where(np.asarray(reader.arrays["counts"][s:s + chunk_rows]) > 0, lp, -np.inf)
        m = lp.max(axis=1, keepdims=True)
        mass_sum += float(np.exp(m[:, 0] + np.log(np.exp(lp - m).sum(axis=1))).sum())
    return {"task": reader.task, "mode": reader.mode.name, "instances": len(reader), "tokens": tokens, "k": reader.k,
            "temperature": reader.temperature, "bytes": nbytes, "row_bytes": row_bytes,
            "bytes_per_token": row_bytes / tokens if tokens else None,
            "mean_kept_mass": mass_sum / tokens if tokens else None}


def find_shards(root: Path) -> list[Path]:
    if (root / MANIFEST_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise ArtifactMismatchError(f"{root}: not a folder")
    shards = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and (p / MANIFEST_FILE).is_file())
    if not shards:
        raise ArtifactMismatchError(f"{root}: no logit-cache shards (folders with {MANIFEST_FILE}) found")
    return shards


def collect(root: Path, verify: bool = True) -> dict[str, Any]:
    rows = [shard_stats(CacheShardReader(p, verify=verify)) for p in find_shards(root)]
    tokens = sum(r["tokens"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    row_bytes = sum(r["row_bytes"] for r in rows)
    mass = sum((r["mean_kept_mass"] or 0.0) * r["tokens"] for r in rows)
    total = {"tasks": len(rows), "instances": sum(r["instances"] for r in rows), "tokens": tokens, "bytes": nbytes,
             "row_bytes": row_bytes, "bytes_per_token": row_bytes / tokens if tokens else None,
             "mean_kept_mass": mass / tokens if tokens else None}
    return {"root": str(root), "tasks": rows, "total": total}


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'task':<40} {'mode':>8} {'inst':>6} {'tokens':>9} {'k':>4} {'bytes/tok':>10} {'kept mass':>10}"]
    for r in report["tasks"]:
        lines.append(f"{r['task'][:40]:<40} {r['mode']:>8} {r['instances']:>6} {r['tokens']:>9} {r['k']:>4} "
                     f"{_fmt(r['bytes_per_token'], '.1f'):>10} {_fmt(r['mean_kept_mass'], '.4f'):>10}")
    t = report["total"]
    lines.append(f"{'TOTAL (' + str(t['tasks']) + ' tasks)':<40} {'':>8} {t['instances']:>6} {t['tokens']:>9} {'':>4} "
                 f"{_fmt(t['bytes_per_token'], '.1f'):>10} {_fmt(t['mean_kept_mass'], '.4f'):>10}")
    lines.append(f"total size on disk (with offsets and manifests): {t['bytes'] / 2**20:.3f} MiB")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="cache root (runs/<run>/logit_cache) or one task's shard folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every data file")


def main(args: argparse.Namespace) -> int:
    report = collect(Path(args.dir), verify=not args.no_verify)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
