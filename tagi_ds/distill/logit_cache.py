"""Teacher logit cache: per task, what the teacher says at every label position, on disk, in one of three modes.

One shard per task, a folder `<cache_root>/<task>/`; the mode (`teacher_rows.CacheMode`: topk | sampled | priority)
decides the per-position arrays, each a raw row-major file of shape (tokens, columns):
  logprobs.bin   (tokens, w) float16: log_softmax(teacher_logits / T) at the row's ids (topk: sorted descending)
  ids.bin        (tokens, w) uint16 when vocab_size <= 65535, else int32: vocabulary ids
  counts.bin     sampled only, (tokens, N) uint8 (uint16 for N > 255): how often each id was drawn (0 = padding)
  threshold.bin  priority only, (tokens, 1) float32: log tau, the (k+1)-th priority key
  offsets.json   {"instances": {instance_id: [start, end)}}: the token rows of each instance
  manifest.json  what produced the shard (tokenizer hash, backbone, teacher adapter hash, mode and its parameters
                 (k | num_samples, sample_seed), T, prompt format, max lengths), dtypes, counts, vocab size and the
                 sha256 + byte size of every data file

Raw `.bin` files (shape and dtype in the manifest) rather than `.npy`, because the writer streams rows as they come
and only knows the final shape at `close()`. Readers memory-map them.

Publication is atomic: the writer fills a hidden temp folder next to the final name and `close()` renames it (see
`io_utils.atomic_dir`), so a killed job leaves nothing under `<cache_root>/<task>` and a rerun simply writes again
(stale temp folders of the same task are removed when a new writer starts: one writer per task at a time).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from ..errors import ArtifactMismatchError, DataError
from ..io_utils import atomic_dir, sha256_file
from .teacher_rows import LOGPROB_DTYPE, CacheMode, decode_rows, encode_instance, ids_dtype

FORMAT = "tagi-ds/logit-cache"
FORMAT_VERSION = 1  # a manifest without "mode" is a top-k shard of this same format
LOGPROBS_FILE = "logprobs.bin"
IDS_FILE = "ids.bin"
OFFSETS_FILE = "offsets.json"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (LOGPROBS_FILE, IDS_FILE, OFFSETS_FILE)  # the top-k shard's files (see `data_files` for any mode)
REQUIRED_FIELDS = ("temperature", "vocab_size")
__all__ = ["CacheShardWriter", "CacheShardReader", "CacheMode", "manifest_fields", "shard_is_complete",
           "tokenizer_hash", "dir_hash", "ids_dtype", "LOGPROB_DTYPE", "data_files"]


def data_files(mode: CacheMode, vocab_size: int) -> tuple[str, ...]:
    """Every data file of a shard of this mode (the per-row arrays, then the offsets)."""
    return (*(f"{name}.bin" for name in mode.layout(vocab_size)), OFFSETS_FILE)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the vocabulary, the special-token map and the added tokens (stable across save/load)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {k: (list(v) if isinstance(v, (list, tuple)) else str(v))
               for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    added = sorted((int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", False)))
                   for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items())
    blob = json.dumps({"vocab": vocab, "special": special, "added": added}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def dir_hash(path: str | os.PathLike) -> str:
    """sha256 over the relative names and sha256 of every file under `path` (e.g. a PEFT teacher adapter dir)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactMismatchError(f"{root}: expected a folder (e.g. a teacher adapter) to hash, found none")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def manifest_fields(*, tokenizer_hash: str, backbone_id: str, teacher_adapter_hash: str, temperature: float,
                    prompt_format: str, max_source_length: int, max_target_length: int, vocab_size: int,
                    k: Optional[int] = None, mode: Union[str, CacheMode] = "topk", num_samples: Optional[int] = None,
                    sample_seed: Optional[int] = None) -> dict[str, Any]:
    """The fields that say which configuration produced a shard; a reader's `expect` is compared with these.

    `vocab_size` is the size of the teacher's logit dimension (can exceed len(tokenizer), e.g. T5's padded 32128).
    Mode parameters (`teacher_rows.CacheMode.make`): topk: k; sampled: num_samples, sample_seed; priority: k,
    sample_seed. A ready CacheMode may be passed as `mode` instead.
    """
    if isinstance(mode, CacheMode):
        cm = CacheMode.make(mode.name, k=None if mode.name == "sampled" else mode.width,
                            num_samples=mode.width if mode.name == "sampled" else None, seed=mode.seed,
                            vocab_size=vocab_size)
    else:
        try:
            cm = CacheMode.make(mode, k=k, num_samples=num_samples, seed=sample_seed, vocab_size=vocab_size)
        except ValueError as e:
            raise ValueError(f"manifest_fields: {e}") from None
    if not temperature > 0:
        raise ValueError(f"manifest_fields: temperature={temperature} must be > 0")
    return {"tokenizer_hash": tokenizer_hash, "backbone_id": backbone_id,
            "teacher_adapter_hash": teacher_adapter_hash, **cm.fields(), "temperature": float(temperature),
            "prompt_format": prompt_format, "max_source_length": int(max_source_length),
            "max_target_length": int(max_target_length), "vocab_size": int(vocab_size)}


def _check_task_name(task: str) -> None:
    if not task or "/" in task or "\\" in task or task.startswith(".") or task in ("..",):
        raise DataError(f"task name {task!r} cannot be used as a cache shard folder name")


def _stale_temp_dirs(out_dir: Path, task: str) -> list[Path]:
    # atomic_dir names its temp folder ".<task>.<8 random chars>.tmp" (tempfile.mkdtemp)
    pat = re.compile(rf"^\.{re.escape(task)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    return [p for p in out_dir.iterdir() if p.is_dir() and pat.match(p.name)] if out_dir.is_dir() else []


Rows = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], Mapping[str, Any]]


class CacheShardWriter:
    """Stream one task's teacher rows into a temp folder; `close()` publishes `<out_dir>/<task>` atomically.

    Use as a context manager (an exception discards the shard) or call `close()` / `abort()` yourself.
    """

    def __init__(self, out_dir: str | os.PathLike, task: str, manifest_fields: Mapping[str, Any]):
        _check_task_name(task)
        missing = [f for f in REQUIRED_FIELDS if f not in manifest_fields]
        if missing:
            raise ValueError(f"CacheShardWriter({task}): manifest_fields lacks {missing}; use manifest_fields(...)")
        self.out_dir = Path(out_dir)
        self.task = task
        self.fields = json.loads(json.dumps(dict(manifest_fields)))  # plain JSON types, a private copy
        self.fields.setdefault("mode", "topk")
        self.mode = CacheMode.from_manifest(self.fields, f"CacheShardWriter({task})")
        self.temperature = float(self.fields["temperature"])
        self.vocab_size = int(self.fields["vocab_size"])
        self.layout = self.mode.layout(self.vocab_size)  # name -> (dtype, columns)
        self.ids_dtype = self.layout["ids"][0]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in _stale_temp_dirs(self.out_dir, task):  # left by a killed writer of this task
            shutil.rmtree(stale, ignore_errors=True)
        self._stack = contextlib.ExitStack()
        self._tmp: Path = self._stack.enter_context(atomic_dir(self.out_dir / task))
        self._fh = {name: open(self._tmp / f"{name}.bin", "wb") for name in self.layout}
        self._hash = {name: hashlib.sha256() for name in self.layout}
        self._offsets: dict[str, list[int]] = {}
        self._rows = 0
        self._open = True

    @property
    def k(self) -> int:
        """Slots per label position (k, or N draws in the sampled mode)."""
        return self.mode.width

    @property
    def final_dir(self) -> Path:
        return self.out_dir / self.task

    def add(self, instance_id: str, logits: Rows) -> None:
        """Append one instance: teacher logits (L, V) at its label positions (encoded by `teacher_rows.encode_rows`,
        seeded per (sample_seed, task, instance)), or rows already encoded: `encode_rows`'s dict, or for a top-k
        shard a (topk_logprobs (L, k), topk_ids (L, k)) pair taken from log_softmax(logits / T)."""
        if not self._open:
            raise RuntimeError(f"CacheShardWriter({self.task}) is closed")
        instance_id = str(instance_id)
        if instance_id in self._offsets:
            raise DataError(f"cache shard {self.task}: instance id {instance_id!r} added twice")
        if isinstance(logits, tuple):
            if self.mode.name != "topk":
                raise DataError(f"cache shard {self.task}: a (logprobs, ids) pair is a top-k row, but this shard's "
                                f"mode is {self.mode.name!r}; pass logits or encode_rows(...)")
            rows = {"logprobs": logits[0].detach().float().cpu().numpy(), "ids": logits[1].detach().cpu().numpy()}
        elif isinstance(logits, torch.Tensor):
            rows = self._encode(instance_id, logits)
        else:
            rows = dict(logits)
        arrays = self._check_rows(instance_id, rows)
        for name, arr in arrays.items():
            b = arr.tobytes()
            self._fh[name].write(b)
            self._hash[name].update(b)
        n = arrays["ids"].shape[0]
        self._offsets[instance_id] = [self._rows, self._rows + n]
        self._rows += n

    def _encode(self, instance_id: str, logits: torch.Tensor) -> dict[str, np.ndarray]:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise DataError(f"cache shard {self.task}: expected teacher logits (L, V={self.vocab_size}), "
                            f"got {tuple(logits.shape)}")
        return encode_instance(logits, self.mode, self.temperature, self.task, instance_id)

    def _check_rows(self, instance_id: str, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        where = f"cache shard {self.task}, instance {instance_id!r}"
        if set(rows) != set(self.layout):
            raise DataError(f"{where}: rows hold {sorted(rows)}, mode {self.mode.name!r} stores {sorted(self.layout)}")
        out, n = {}, None
        for name, (dtype, cols) in self.layout.items():
            a = rows[name]
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            n = a.shape[0] if n is None else n
            if a.ndim != 2 or a.shape != (n, cols):
                raise DataError(f"{where}: expected {name} of shape (L, {cols}) for mode {self.mode.name!r}, got "
                                f"{tuple(a.shape)}")
            out[name] = np.ascontiguousarray(a.astype(dtype))
        ids = out["ids"]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise DataError(f"{where}: token ids outside [0, vocab_size={self.vocab_size})")
        if "counts" in out and n and not (out["counts"].astype(np.int64).sum(1) == self.mode.width).all():
            raise DataError(f"{where}: sampled counts must sum to num_samples={self.mode.width} in every row")
        return out

    def close(self) -> Path:
        """Write offsets + manifest, fsync, and rename the temp folder onto `<out_dir>/<task>`."""
        if not self._open:
            return self.final_dir
        self._open = False
        try:
            for fh in self._fh.values():
                fh.close()
            (self._tmp / OFFSETS_FILE).write_text(json.dumps({"instances": self._offsets}, sort_keys=True))
            files = {f"{name}.bin": {"sha256": self._hash[name].hexdigest(),
                                     "bytes": (self._tmp / f"{name}.bin").stat().st_size} for name in self.layout}
            files[OFFSETS_FILE] = {"sha256": sha256_file(self._tmp / OFFSETS_FILE),
                                   "bytes": (self._tmp / OFFSETS_FILE).stat().st_size}
            manifest = {**self.fields, "format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task,
                        "dtypes": {name: np.dtype(dt).name for name, (dt, _) in self.layout.items()},
                        "counts": {"instances": len(self._offsets), "tokens": self._rows}, "files": files}
            (self._tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        self._stack.close()  # atomic_dir: fsync every file, rename onto the final name
        return self.final_dir

    def abort(self) -> None:
        """Discard the temp folder; nothing is published."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(Exception):
            for fh in self._fh.values():
                fh.close()
        err = RuntimeError("aborted")
        self._stack.__exit__(RuntimeError, err, None)  # atomic_dir removes its temp folder

    def __enter__(self) -> "CacheShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# The mode and its parameters are compared first, so a shard of another mode is refused by naming 'mode'
# (not by a parameter that the other mode does not have).
_FIRST = ("mode", "k", "num_samples", "sample_seed")


def check_expect(manifest: Mapping[str, Any], expect: Mapping[str, Any], where: str) -> None:
    """Raise ArtifactMismatchError naming the first field whose value differs from `expect` (both values shown)."""
    want_all = _normalise(dict(expect))
    keys = [k for k in _FIRST if k in want_all] + [k for k in want_all if k not in _FIRST]
    for key in keys:
        want = want_all[key]
        if key not in manifest:
            raise ArtifactMismatchError(f"{where}: manifest has no field '{key}' (expected {want!r}); "
                                        f"the cache was written by another version, mode or configuration")
        have = manifest[key]
        if have != want:
            raise ArtifactMismatchError(f"{where}: manifest field '{key}' is {have!r} but this run expects {want!r}; "
                                        f"rebuild the cache (tagi-ds cache-logits) for this configuration")


class CacheShardReader:
    """A published shard, checked against `expect` and its checksums, read memory-mapped."""

    def __init__(self, shard_dir: str | os.PathLike, expect: Mapping[str, Any] | None = None, verify: bool = True):
        self.dir = Path(shard_dir)
        mpath = self.dir / MANIFEST_FILE
        if not mpath.is_file():
            raise ArtifactMismatchError(f"{mpath}: no cache manifest (not a published logit-cache shard)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactMismatchError(f"{mpath}: manifest is not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactMismatchError(f"{mpath}: format {self.manifest.get('format')!r} version "
                                        f"{self.manifest.get('format_version')!r}, expected {FORMAT!r} "
                                        f"{FORMAT_VERSION}")
        self.manifest.setdefault("mode", "topk")  # written before modes existed
        check_expect(self.manifest, expect or {}, str(mpath))
        self.mode = CacheMode.from_manifest(self.manifest, str(mpath))
        self.temperature = float(self.manifest["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.tokens = int(self.manifest["counts"]["tokens"])
        layout = self.mode.layout(self.vocab_size)
        dtypes = self.manifest.get("dtypes", {})
        shapes: dict[str, tuple[np.dtype, int]] = {}
        for name, (_, cols) in layout.items():
            if name not in dtypes:
                raise ArtifactMismatchError(f"{mpath}: no dtype recorded for {name} (mode {self.mode.name!r})")
            shapes[name] = (np.dtype(dtypes[name]), cols)
            self._check_file(f"{name}.bin", self.tokens * cols * shapes[name][0].itemsize, verify)
        self._check_file(OFFSETS_FILE, None, verify)
        offsets = json.loads((self.dir / OFFSETS_FILE).read_text())["instances"]
        self._offsets: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in offsets.items()}
        if len(self._offsets) != int(self.manifest["counts"]["instances"]) or any(
                not 0 <= s <= e <= self.tokens for s, e in self._offsets.values()):
            raise ArtifactMismatchError(f"{self.dir / OFFSETS_FILE}: offsets disagree with the manifest counts")
        # np.memmap refuses a zero-byte file: an empty shard gets empty in-memory arrays
        self.arrays: dict[str, np.ndarray] = {
            name: (np.memmap(self.dir / f"{name}.bin", dtype=dt, mode="r", shape=(self.tokens, cols))
                   if self.tokens else np.zeros((self.tokens, cols), dt))
            for name, (dt, cols) in shapes.items()}
        self.logprobs, self.ids = self.arrays["logprobs"], self.arrays["ids"]

    @property
    def k(self) -> int:
        """Slots per label position (k, or N draws in the sampled mode)."""
        return self.mode.width

    def _check_file(self, name: str, want_bytes: int | None, verify: bool) -> None:
        path = self.dir / name
        info = self.manifest.get("files", {}).get(name)
        if info is None:
            raise ArtifactMismatchError(f"{self.dir / MANIFEST_FILE}: no checksum recorded for {name}")
        if not path.is_file():
            raise ArtifactMismatchError(f"{path}: data file is missing")
        size = path.stat().st_size
        want = info["bytes"] if want_bytes is None else want_bytes
        if size != want or size != info["bytes"]:
            raise ArtifactMismatchError(f"{path}: file has {size} bytes, expected {want} "
                                        f"({'truncated' if size < want else 'too long'}); rebuild this shard")
        if verify and sha256_file(path) != info["sha256"]:
            raise ArtifactMismatchError(f"{path}: sha256 checksum does not match the manifest (corrupt file); "
                                        f"rebuild this shard")

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def instance_ids(self) -> list[str]:
        return list(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, instance_id: object) -> bool:
        return str(instance_id) in self._offsets

    def length(self, instance_id: str) -> int:
        s, e = self._span(instance_id)
        return e - s

    def _span(self, instance_id: str) -> tuple[int, int]:
        try:
            return self._offsets[str(instance_id)]
        except KeyError:
            raise ArtifactMismatchError(f"{self.dir}: instance {instance_id!r} is not in this cache shard "
                                        f"({len(self._offsets)} instances); was the cache built from other data?") from None

    def rows(self, instance_id: str) -> dict[str, torch.Tensor]:
        """Every stored array of one instance, (L, columns) each: float32 log-probs / threshold, int64 ids / counts."""
        s, e = self._span(instance_id)
        return decode_rows({name: arr[s:e] for name, arr in self.arrays.items()})

    def get(self, instance_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (L, w) float32, ids (L, w) int64) of one instance (see `rows` for a mode's other arrays)."""
        r = self.rows(instance_id)
        return r["logprobs"], r["ids"]


def shard_is_complete(shard_dir: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> bool:
    """True when a published, intact shard for this configuration exists (a cache stage can skip the task)."""
    try:
        CacheShardReader(shard_dir, expect)
    except ArtifactMismatchError:
        return False
    return True
