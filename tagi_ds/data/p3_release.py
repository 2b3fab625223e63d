"""bigscience/P3 as released (TFRecord shards) → the jsonl layout `tagi_ds.data.p3` reads.

    python tools/convert_p3.py SRC OUT [--all] [--only GLOB ...] [--force]

The release, as its hub loading script `P3.py` reads it (seqio's cache format):
    SRC[/data]/<dataset_prompt>/info.<split>.json      {"num_shards": n, "features": {name: {"shape", "dtype"}}, …}
                               /<split>.tfrecord-00000-of-0000n   (n shards, each of tf.train.Example records)
Features: inputs / targets (token ids, int32 stored as int64), inputs_pretokenized / targets_pretokenized (strings),
answer_choices (strings, classification prompts), idx / is_correct / weight (`*_score_eval` folders only).
P3.py parses each record against the info specs: shape [] is one value exactly, shape [None] is a list that may be
absent (empty); strings are UTF-8. The same rules are checked here, for the features written out.

Output, one folder per dataset-prompt: OUT/<dataset_prompt>/<split>.jsonl with `inputs_pretokenized`,
`targets_pretokenized` and `answer_choices` (only where the prompt has them), plus `_conversion.json` (source,
rows per split). Each folder is written under a temporary name and renamed when complete, so a rerun skips the
folders already there and redoes only those that were interrupted (run one converter per OUT at a time).
Folders are converted `--workers` at a time, one process each.
By default only the folders T0's training mixture and held-out evaluation use are converted (`--all`: every one).
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError, TagiError
from ..io_utils import atomic_dir, atomic_write_json
from .p3 import classify_folder
from .tfrecord import Feature, iter_examples

TEXT_FEATURES = ("inputs_pretokenized", "targets_pretokenized")  # required in every converted prompt
OPTIONAL_FEATURES = ("answer_choices",)
MARKER = "_conversion.json"
_SHARD = re.compile(r"^(?P<split>.+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")
_KIND_OF_DTYPE = {"string": "bytes", "float32": "float", "float64": "float", "int32": "int64", "int64": "int64",
                  "bool": "int64"}  # how tf.train.Example stores each seqio dtype


@dataclass(frozen=True)
class SplitSpec:
    split: str
    info: Path
    features: dict  # name → {"shape": [...], "dtype": str}
    shards: tuple[Path, ...]


def release_root(src: str | Path) -> Path:
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"{root}: P3 release folder not found")
    return root / "data" if (root / "data").is_dir() else root


def list_release_folders(root: Path) -> list[Path]:
    """Dataset-prompt folders of the release (those holding an info.<split>.json), sorted by name."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("info.*.json")))
    if not folders:
        raise DataError(f"{root}: no P3 dataset-prompt folders (expected <dataset_prompt>/info.<split>.json next to "
                        f"<split>.tfrecord-00000-of-00001 files, as in the bigscience/P3 release's data/ folder)")
    return folders


def read_split_specs(folder: Path) -> list[SplitSpec]:
    """Every split of one release folder: its feature specs and its complete, ordered list of shards."""
    shards: dict[str, dict[int, tuple[int, Path]]] = {}
    for p in folder.iterdir():
        m = _SHARD.match(p.name)
        if m:
            shards.setdefault(m["split"], {})[int(m["i"])] = (int(m["n"]), p)
    specs = []
    for info in sorted(folder.glob("info.*.json")):
        split = info.name[len("info."):-len(".json")]
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{info}: not valid JSON ({e})") from None
        feats = meta.get("features") if isinstance(meta, dict) else None
        if not isinstance(feats, dict) or not all(isinstance(v, dict) and "dtype" in v and "shape" in v
                                                  for v in feats.values()):
            raise DataError(f"{info}: expected {{\"features\": {{name: {{\"shape\": [...], \"dtype\": ...}}}}}}")
        for name in TEXT_FEATURES + OPTIONAL_FEATURES:
            if name in feats and feats[name]["dtype"] != "string":
                raise DataError(f"{info}: feature '{name}' has dtype {feats[name]['dtype']!r}, expected 'string'")
        have = shards.get(split, {})
        n = meta.get("num_shards", len(have))
        missing = [i for i in range(n) if i not in have]
        if not have or missing or any(total != n for total, _ in have.values()):
            raise DataError(f"{info}: num_shards is {n} but the {split}.tfrecord-*-of-* files found are "
                            f"{sorted(p.name for _, p in have.values()) or 'none'}")
        specs.append(SplitSpec(split, info, feats, tuple(have[i][1] for i in range(n))))
    return specs


def _value(feat: Optional[Feature], name: str, spec: dict, where: str):
    """One feature of one record as P3.py would return it: a str for shape [], a list of str for shape [None]."""
    scalar = spec["shape"] == []
    if feat is None or feat.kind is None:
        if scalar:
            raise DataError(f"{where}: feature '{name}' is missing (info says one {spec['dtype']} value)")
        return []
    if feat.kind != _KIND_OF_DTYPE.get(spec["dtype"]):
        raise DataError(f"{where}: feature '{name}' is a {feat.kind}_list, info says {spec['dtype']}")
    if scalar and len(feat.values) != 1:
        raise DataError(f"{where}: feature '{name}' has {len(feat.values)} values, info says shape []")
    try:
        texts = [v.decode("utf-8") for v in feat.values]
    except UnicodeDecodeError:
        raise DataError(f"{where}: feature '{name}' is not UTF-8 text") from None
    return texts[0] if scalar else texts


def convert_split(spec: SplitSpec, out_file: Path) -> int:
    """Stream one split's shards into a jsonl file (the caller publishes it); returns the row count."""
    missing = [n for n in TEXT_FEATURES if n not in spec.features]
    if missing:
        raise DataError(f"{spec.info}: features lack {', '.join(missing)} (have: {', '.join(spec.features)})")
    keep = [n for n in TEXT_FEATURES + OPTIONAL_FEATURES if n in spec.features]
    rows = 0
    with open(out_file, "w", encoding="utf-8") as fh:
        for shard in spec.shards:
            for rec, ex in iter_examples(shard, only=keep):
                where = f"{shard}: record {rec.index} at byte {rec.offset}"
                row = {n: _value(ex.get(n), n, spec.features[n], where) for n in keep}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
    return rows


def convert_folder(folder: Path, out: Path) -> dict[str, int]:
    """One dataset-prompt folder → OUT/<name>/<split>.jsonl + marker, published atomically; rows per split."""
    specs = read_split_specs(folder)
    if not specs:
        raise DataError(f"{folder}: no info.<split>.json files")
    counts = {}
    with atomic_dir(out / folder.name) as tmp:
        for spec in specs:
            counts[spec.split] = convert_split(spec, tmp / f"{spec.split}.jsonl")
        atomic_write_json(tmp / MARKER, {"source": str(folder), "rows": counts,
                                         "shards": {s.split: [p.name for p in s.shards] for s in specs}})
    return counts


def _wanted(name: str, all_folders: bool, only: Sequence[str]) -> bool:
    if only and not any(fnmatch.fnmatchcase(name, pat) for pat in only):
        return False
    return all_folders or classify_folder(name) is not None


@dataclass
class ConversionSummary:
    converted: dict[str, dict[str, int]]  # folder → rows per split
    skipped: list[str]                    # already converted (marker present)


def convert_p3(src: str | Path, out: str | Path, all_folders: bool = False, only: Sequence[str] = (),
               force: bool = False, progress: bool = True, workers: int = 1) -> ConversionSummary:
    """Convert every wanted release folder under `src` into `out`, `workers` folders at a time (processes: the
    decoding is Python-bound, see bench/tfrecord.py); folders already converted are skipped."""
    from tqdm.auto import tqdm

    root, out = release_root(src), Path(out)
    folders = [f for f in list_release_folders(root) if _wanted(f.name, all_folders, only)]
    if not folders:
        raise DataError(f"{root}: no release folder matches (T0 folders only unless --all; --only {list(only)})")
    out.mkdir(parents=True, exist_ok=True)
    summary = ConversionSummary({}, [])
    todo = []
    for folder in folders:
        if (out / folder.name / MARKER).is_file() and not force:
            summary.skipped.append(folder.name)
            continue
        for stale in out.glob(f".{glob.escape(folder.name)}.*.tmp"):  # left by a killed run (atomic_dir's temporary names)
            shutil.rmtree(stale, ignore_errors=True)
        todo.append(folder)
    bar = tqdm(total=len(folders), initial=len(summary.skipped), desc="P3 prompts", unit="prompt",
               disable=not progress)
    try:
        if workers <= 1:
            for folder in todo:
                bar.set_postfix_str(folder.name[:40])
                summary.converted[folder.name] = convert_folder(folder, out)
                bar.update()
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(workers) as pool:
                jobs = {pool.submit(convert_folder, f, out): f for f in todo}
                try:
                    for job in as_completed(jobs):
                        summary.converted[jobs[job].name] = job.result()  # re-raises a worker's DataError
                        bar.update()
                except BaseException:
                    for job in jobs:  # folders not started yet are dropped; running ones finish (atomically)
                        job.cancel()
                    raise
    finally:
        bar.close()
    summary.converted = dict(sorted(summary.converted.items()))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="convert_p3.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the P3 release (the folder holding data/, or data/ itself)")
    ap.add_argument("out", help="output folder: set data.p3_dir to it")
    ap.add_argument("--all", action="store_true", help="convert every folder, not only T0 train / held-out ones")
    ap.add_argument("--only", action="append", default=[], metavar="GLOB",
                    help="convert only folders whose name matches (repeatable), e.g. 'super_glue_rte_*'")
    ap.add_argument("--force", action="store_true", help="reconvert folders that are already converted")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="folders converted at once, one process each (default: min(8, CPUs))")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        s = convert_p3(args.src, args.out, args.all, args.only, args.force, not args.no_progress, args.workers)
    except TagiError as e:
        print(f"convert_p3: error: {e}", file=sys.stderr)
        return e.exit_code
    rows = sum(sum(c.values()) for c in s.converted.values())
    print(f"converted {len(s.converted)} prompt folder(s), {rows} rows; skipped {len(s.skipped)} already converted; "
          f"output: {args.out}")
    return 0
