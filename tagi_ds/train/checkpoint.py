"""Checkpoint layout, integrity checks, RNG/progress records, and the DeepSpeed-free export of trainable weights.

<out_dir>/checkpoints/
    step00000010/            one tag per saved step (DeepSpeed's files, or the plain loop's trainable.pt +
                             optimizer.pt), progress_rank<r>.pt, and manifest.json written last by rank 0
    latest                   the tag of the newest COMPLETE checkpoint, replaced atomically after manifest.json
A checkpoint without a manifest, with a missing file, or with a file whose size / sha256 differ is refused with
ArtifactMismatchError naming the file; `latest` never points at a checkpoint that is still being written.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ArtifactMismatchError
from ..io_utils import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from ..run.export_io import trainable_named_parameters, write_export

LATEST = "latest"
MANIFEST = "manifest.json"
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------ integrity
def write_manifest(tag_dir: Path, step: int, world_size: int) -> None:
    """Record every file of a finished checkpoint (size + sha256); called on rank 0 after all ranks wrote."""
    files = {}
    for f in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            continue
        files[f.relative_to(tag_dir).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    atomic_write_json(tag_dir / MANIFEST, {"step": step, "world_size": world_size, "files": files})


def verify_checkpoint(tag_dir: str | Path) -> dict:
    """Check a checkpoint folder against its manifest; return the manifest or raise ArtifactMismatchError."""
    tag_dir = Path(tag_dir)
    man_path = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        raise ArtifactMismatchError(f"{tag_dir}: checkpoint folder is missing")
    if not man_path.is_file():
        raise ArtifactMismatchError(f"{man_path}: missing; the checkpoint in {tag_dir} is incomplete "
                                    f"(the run was probably killed while saving it)")
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
        files = man["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactMismatchError(f"{man_path}: unreadable checkpoint manifest ({e})") from None
    for rel, meta in files.items():
        f = tag_dir / rel
        if not f.is_file():
            raise ArtifactMismatchError(f"{f}: listed in {man_path} but missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactMismatchError(f"{f}: {size} bytes, the manifest says {meta['bytes']} "
                                        f"(truncated or overwritten)")
        if sha256_file(f) != meta["sha256"]:
            raise ArtifactMismatchError(f"{f}: sha256 differs from {man_path} (corrupted)")
    return man


def read_latest(ckpt_root: str | Path) -> Optional[str]:
    """The tag in `<ckpt_root>/latest`, or None when no checkpoint was ever completed."""
    p = Path(ckpt_root) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text(encoding="utf-8").strip()
    if step_of(tag) is None:
        raise ArtifactMismatchError(f"{p}: expected a tag like step00000010, got {tag[:80]!r}")
    return tag


def write_latest(ckpt_root: str | Path, tag: str) -> None:
    atomic_write_text(Path(ckpt_root) / LATEST, tag + "\n")


def prune_checkpoints(ckpt_root: str | Path, keep: int, latest_tag: str) -> list[str]:
    """Delete all but the `keep` newest step folders (never the one `latest` names); return the deleted tags."""
    root = Path(ckpt_root)
    tags = sorted((t.name for t in root.iterdir() if t.is_dir() and step_of(t.name) is not None), key=step_of)
    doomed = [t for t in tags[: max(0, len(tags) - max(1, keep))] if t != latest_tag]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------- progress and RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def progress_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"progress_rank{rank}.pt"


def save_progress(tag_dir: Path, rank: int, progress: dict) -> None:
    with atomic_path(progress_file(tag_dir, rank)) as tmp:
        torch.save({"progress": progress, "rng": rng_state()}, tmp)


def load_progress(tag_dir: Path, rank: int) -> dict:
    """This rank's progress record (rank 0's when the world grew); restores the RNG states it holds."""
    f = progress_file(tag_dir, rank)
    if not f.is_file():
        f = progress_file(tag_dir, 0)
    rec = load_torch_file(f)
    set_rng_state(rec["rng"])
    return rec["progress"]


def load_torch_file(f: Path) -> Any:
    try:
        # Our own files, already checked against the manifest; numpy RNG state needs full unpickling.
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ArtifactMismatchError(f"{f}: cannot be read as a checkpoint file ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------ export
def export_trainable(out_dir: str | Path, module: torch.nn.Module, config_dict: dict) -> Optional[Path]:
    """Write the trainable weights of `module` in the export format (run/export_io.py), loadable without DeepSpeed.

    Every rank must call this (under ZeRO-3 the weights are gathered collectively with GatheredParameters); rank 0
    writes the folder atomically. Returns the folder on rank 0, None elsewhere. Tensor names are those of
    `module.named_parameters()`; the frozen backbone is never included.
    """
    from ..run.dist import barrier, collective_guard, rank

    named = trainable_named_parameters(module)
    if not named:
        raise ArtifactMismatchError(f"{out_dir}: nothing to export, the module has no trainable parameters")
    tensors: dict[str, torch.Tensor] = {}
    zero3 = any(hasattr(p, "ds_id") for _, p in named)
    if zero3:
        import deepspeed

        with collective_guard("export gather"), deepspeed.zero.GatheredParameters([p for _, p in named],
                                                                                  modifier_rank=None):
            if rank() == 0:
                tensors = {n: p.detach().cpu().clone().contiguous() for n, p in named}
    elif rank() == 0:
        tensors = {n: p.detach().cpu().clone().contiguous() for n, p in named}
    final = write_export(out_dir, tensors, config_dict) if rank() == 0 else None
    barrier()
    return final


# -------------------------------------------------------------------------------------- consolidated weights
CONSOLIDATED = "consolidated.safetensors"  # the trainable weights, whole: what a resume on another world size loads


def _gathered(named: list, zero3: bool):
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)


def save_consolidated(tag_dir: Path, module: torch.nn.Module) -> None:
    """Collective: the trainable weights gathered whole, written by rank 0 into the checkpoint folder."""
    from safetensors.torch import save_file

    from ..run.dist import collective_guard, rank

    named = trainable_named_parameters(module)
    zero3 = any(hasattr(p, "ds_id") for _, p in named)
    with collective_guard("consolidated-weights gather"), _gathered(named, zero3):
        if rank() == 0:
            tensors = {n: p.detach().float().cpu().clone().contiguous() for n, p in named}
            with atomic_path(Path(tag_dir) / CONSOLIDATED) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_consolidated(tag_dir: Path, module: torch.nn.Module) -> None:
    """Copy a checkpoint's consolidated weights into `module`'s trainable parameters, on every rank (ZeRO-3: into the
    gathered parameters, re-partitioned on exit). Names and shapes must match."""
    from safetensors.torch import load_file

    path = Path(tag_dir) / CONSOLIDATED
    if not path.is_file():
        raise ArtifactMismatchError(f"{path}: missing; this checkpoint predates elastic resume: resume it with the "
                                    f"world size it was written with")
    tensors = load_file(str(path))
    named = trainable_named_parameters(module)
    if set(tensors) != {n for n, _ in named}:
        raise ArtifactMismatchError(f"{path}: trainable parameter names differ from the model's")
    zero3 = any(hasattr(p, "ds_id") for _, p in named)
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for n, p in named:
            p.copy_(tensors[n].to(p.dtype))
