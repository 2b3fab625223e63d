"""Where the adapter tools may write, and on which device they may run: checked before any model loads.

An output path never equals, contains or lies inside an input of the same command (the export, the backbone, the
task files, the inputs file, the adapter cache), and never lies inside a run folder (whose files are artifacts of
stages: teachers, caches, exports, predictions). An existing output folder is replaced only when it is an adapter
this tool wrote before (it holds `tagi_adapter.json`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import TagiError

GENERATED_MARKER = "tagi_adapter.json"  # generate.ADAPTER_META: what makes a folder one of our generated adapters
RUN_SUBFOLDERS = ("teachers", "logit_cache", "finetune", "baselines")  # a folder holding one of these is a run


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def is_artifact_folder(d: Path) -> bool:
    """True for a run folder, or a folder a stage published (teacher, cache shard, stage folder, export, checkpoint,
    adapter-cache entry), recognised by the records only tagi-ds writes."""
    if (d / ".pipeline").is_dir() or (d / "tagi_cache.json").is_file():
        return True
    if any((d / sub).is_dir() for sub in RUN_SUBFOLDERS) or (d / "pretrain" / "stage.json").is_file() \
            or (d / "eval" / "stage.json").is_file():
        return True
    stage = _json(d / "stage.json")
    if "stage" in stage and "hash" in stage:
        return True
    manifest = _json(d / "manifest.json")
    if str(manifest.get("kind", "")).startswith("tagi-ds") or str(manifest.get("format", "")).startswith("tagi-ds") \
            or ("files" in manifest and "step" in manifest):
        return True
    return str(_json(d / "config.json").get("format", "")).startswith("tagi-ds")


def run_artifact_root(path: Path) -> Optional[Path]:
    """The nearest folder at or above `path` that is (part of) a run's artifacts, or None."""
    for d in [path, *path.parents]:
        if d.is_dir() and is_artifact_folder(d):
            return d
    return None


def check_output(out: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]], *, flag: str = "--out",
                 folder: bool) -> Path:
    """Refuse (TagiError, exit 2) an output that would overwrite an input or a run's artifact; return the path."""
    out = Path(out)
    real = _real(out)
    for inp in inputs:
        if inp is None or not str(inp) or not Path(os.path.expanduser(str(inp))).exists():
            continue  # a hub id, or nothing there: nothing to overwrite
        src = _real(inp)
        if _within(real, src) or _within(src, real):
            how = "is" if real == src else ("lies inside" if _within(real, src) else "contains")
            raise TagiError(f"{flag} {out}: {how} the input {inp}; an output never replaces what the command "
                            f"reads: choose another path")
    owner = run_artifact_root(real if real.exists() else real.parent)
    if owner is not None:
        where = "is" if owner == real else f"lies inside {owner}, which is"
        raise TagiError(f"{flag} {out}: {where} a run's artifact (a run folder, teacher, cache shard, stage folder, "
                        f"export or adapter-cache entry); write the output outside every run folder")
    if folder:
        if real.exists() and not real.is_dir():
            raise TagiError(f"{flag} {out}: exists and is a file; give a directory path for the adapter")
        if real.is_dir() and any(real.iterdir()) and not (real / GENERATED_MARKER).is_file():
            raise TagiError(f"{flag} {out}: exists, is not empty and is not an adapter written by generate-adapter "
                            f"(no {GENERATED_MARKER}); refusing to replace it")
    elif real.is_dir():
        raise TagiError(f"{flag} {out}: is a directory; give the path of the predictions .jsonl file")
    return out


def check_device(device: Optional[str]) -> str:
    """`--device`: cpu, cuda or cuda:N that exists here; default cuda when available. TagiError otherwise."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TagiError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TagiError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TagiError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise TagiError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return str(dev)


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (argparse prints the error and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse
