"""Checkpoint layout, integrity checks, RNG/progress records, and the DeepSpeed-free export of trainable weights.

<out_dir>/checkpoints/
    step00000010/            one tag per saved step (DeepSpeed's files, or the plain loop's trainable.pt +
                             optimizer.pt), progress_rank<r>.pt, and manifest.json written last by rank 0
    latest                   the tag of the newest COMPLETE checkpoint, replaced atomically after manifest.json
A checkpoint without a manifest, with a missing file, or with a file whose size / sha256 differ is refused with
ArtifactMismatchError naming the file; `latest` never points at a checkpoint that is still being written.

No pickle from a run folder (a planted file must never run code): our own files hold only tensors, numbers, strings
and lists (RNG states included), and are read with `torch.load(weights_only=True)`, which refuses any other object.
DeepSpeed's files are read by DeepSpeed with full unpickling; a checkpoint holding any file of ours that is not in
SAFE_FILES is loaded only when its manifest carries an HMAC made with this user's key (`checkpoint_key`, kept
outside every run folder), which a file planted in the run folder cannot forge.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ArtifactMismatchError
from ..io_utils import atomic_path, atomic_write_json, atomic_write_text, sha256_file, torch_save
from ..run.export_io import trainable_named_parameters, write_export

LATEST = "latest"
MANIFEST = "manifest.json"
_TAG_RE = re.compile(r"^step(\d{8})$")
# Files read with torch.load(weights_only=True) by our own code: safe without a signature.
SAFE_FILES = re.compile(r"^(trainable\.pt|optimizer\.pt|progress_rank\d+\.pt|.*\.safetensors|.*\.json)$")
KEY_ENV = "TAGI_DS_CHECKPOINT_KEY"


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
    man = {"step": step, "world_size": world_size, "files": files}
    if needs_signature(files):
        man["hmac"] = _sign(files)
    atomic_write_json(tag_dir / MANIFEST, man)


# ------------------------------------------------------------------------------------------ signatures
def checkpoint_key_path() -> Path:
    """$TAGI_DS_CHECKPOINT_KEY, else ~/.config/tagi-ds/checkpoint.key: outside every run folder."""
    env = os.environ.get(KEY_ENV)
    return Path(env) if env else Path.home() / ".config" / "tagi-ds" / "checkpoint.key"


def checkpoint_key(create: bool) -> Optional[bytes]:
    """This user's secret for checkpoint manifests (32 random bytes, file mode 0600), made on first use."""
    path = checkpoint_key_path()
    if path.is_file():
        return path.read_bytes()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(os.urandom(32))
        os.chmod(tmp, 0o600)
    path.chmod(0o600)
    return path.read_bytes()


def needs_signature(files: dict) -> bool:
    """True when a checkpoint holds a file that a library unpickles fully (DeepSpeed's model / optimizer states)."""
    return any(not SAFE_FILES.match(Path(rel).name) for rel in files)


def _sign(files: dict, key: Optional[bytes] = None) -> str:
    key = key if key is not None else checkpoint_key(create=True)
    body = json.dumps(files, sort_keys=True).encode("utf-8")
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _check_signature(man: dict, man_path: Path) -> None:
    key = checkpoint_key(create=False)
    sig = man.get("hmac")
    if key is None or not isinstance(sig, str) or not hmac.compare_digest(sig, _sign(man["files"], key)):
        why = ("it has no signature" if not isinstance(sig, str) else
               "no checkpoint key exists here" if key is None else "its signature does not match this user's key")
        raise ArtifactMismatchError(
            f"{man_path}: {why} ({checkpoint_key_path()}). This checkpoint holds pickle files that loading would "
            f"execute, so only checkpoints written by this user's runs are loaded; if you trust it, sign it with "
            f"`python -m tagi_ds.train.checkpoint --sign {man_path.parent}`, or remove it to start over")


def sign_checkpoint(tag_dir: str | Path) -> None:
    """Re-sign a trusted checkpoint's manifest with this user's key (its files are hashed again)."""
    tag_dir = Path(tag_dir)
    man = json.loads((tag_dir / MANIFEST).read_text(encoding="utf-8"))
    write_manifest(tag_dir, int(man["step"]), int(man.get("world_size", 1)))


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
    if needs_signature(files):
        _check_signature(man, man_path)
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
    """Every RNG's state as tensors, numbers and lists only (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def progress_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"progress_rank{rank}.pt"


def save_progress(tag_dir: Path, rank: int, progress: dict) -> None:
    with atomic_path(progress_file(tag_dir, rank)) as tmp:
        torch_save({"progress": progress, "rng": rng_state()}, tmp)


def load_progress(tag_dir: Path, rank: int) -> dict:
    """This rank's progress record (rank 0's when the world grew); restores the RNG states it holds."""
    f = progress_file(tag_dir, rank)
    if not f.is_file():
        f = progress_file(tag_dir, 0)
    rec = load_torch_file(f)
    set_rng_state(rec["rng"])
    return rec["progress"]


def load_torch_file(f: Path) -> Any:
    """One of our checkpoint files: tensors, numbers, strings, lists and dicts only. `weights_only=True` refuses any
    other object, so a planted pickle is an error here, never code that runs."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ArtifactMismatchError(f"{f}: cannot be read as a checkpoint file: it holds something other than "
                                    f"tensors and plain values (refused, never unpickled: {msg})") from None


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

def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tagi_ds.train.checkpoint --sign DIR`: trust a checkpoint folder (re-sign its manifest)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tagi_ds.train.checkpoint")
    p.add_argument("--sign", required=True, metavar="DIR", help="a checkpoint folder (<stage>/checkpoints/stepN)")
    args = p.parse_args(argv)
    sign_checkpoint(args.sign)
    print(f"signed {Path(args.sign) / MANIFEST} with {checkpoint_key_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
