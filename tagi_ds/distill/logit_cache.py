"""Teacher logit cache: per task, the teacher's top-k log-probabilities at every label position, on disk.

One shard per task, a folder `<cache_root>/<task>/`:
  logprobs.bin   (tokens, k) float16, row-major: log_softmax(teacher_logits / T) top-k, sorted descending
  ids.bin        (tokens, k) uint16 when vocab_size <= 65535, else int32: the vocabulary ids of those log-probs
  offsets.json   {"instances": {instance_id: [start, end)}}: the token rows of each instance
  manifest.json  what produced the shard (tokenizer hash, backbone, teacher adapter hash, k, T, prompt format,
                 max lengths), dtypes, counts, vocab size and the sha256 + byte size of every data file

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
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ArtifactMismatchError, DataError
from ..io_utils import atomic_dir, sha256_file

FORMAT = "tagi-ds/logit-cache"
FORMAT_VERSION = 1
LOGPROBS_FILE = "logprobs.bin"
IDS_FILE = "ids.bin"
OFFSETS_FILE = "offsets.json"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (LOGPROBS_FILE, IDS_FILE, OFFSETS_FILE)
LOGPROB_DTYPE = np.float16
REQUIRED_FIELDS = ("k", "temperature", "vocab_size")


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; bigger vocabularies (LLaMA-3: 128k) need int32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


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


def manifest_fields(*, tokenizer_hash: str, backbone_id: str, teacher_adapter_hash: str, k: int,
                    temperature: float, prompt_format: str, max_source_length: int, max_target_length: int,
                    vocab_size: int) -> dict[str, Any]:
    """The fields that say which configuration produced a shard; a reader's `expect` is compared with these.

    `vocab_size` is the size of the teacher's logit dimension (can exceed len(tokenizer), e.g. T5's padded 32128).
    """
    if k < 1 or k > vocab_size:
        raise ValueError(f"manifest_fields: k={k} must be in [1, vocab_size={vocab_size}]")
    if not temperature > 0:
        raise ValueError(f"manifest_fields: temperature={temperature} must be > 0")
    return {"tokenizer_hash": tokenizer_hash, "backbone_id": backbone_id,
            "teacher_adapter_hash": teacher_adapter_hash, "k": int(k), "temperature": float(temperature),
            "prompt_format": prompt_format, "max_source_length": int(max_source_length),
            "max_target_length": int(max_target_length), "vocab_size": int(vocab_size)}


def _check_task_name(task: str) -> None:
    if not task or "/" in task or "\\" in task or task.startswith(".") or task in ("..",):
        raise DataError(f"task name {task!r} cannot be used as a cache shard folder name")


def _stale_temp_dirs(out_dir: Path, task: str) -> list[Path]:
    # atomic_dir names its temp folder ".<task>.<8 random chars>.tmp" (tempfile.mkdtemp)
    pat = re.compile(rf"^\.{re.escape(task)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    return [p for p in out_dir.iterdir() if p.is_dir() and pat.match(p.name)] if out_dir.is_dir() else []


class CacheShardWriter:
    """Stream one task's teacher top-k into a temp folder; `close()` publishes `<out_dir>/<task>` atomically.

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
        self.k = int(self.fields["k"])
        self.temperature = float(self.fields["temperature"])
        self.vocab_size = int(self.fields["vocab_size"])
        self.ids_dtype = ids_dtype(self.vocab_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in _stale_temp_dirs(self.out_dir, task):  # left by a killed writer of this task
            shutil.rmtree(stale, ignore_errors=True)
        self._stack = contextlib.ExitStack()
        self._tmp: Path = self._stack.enter_context(atomic_dir(self.out_dir / task))
        self._lp_fh = open(self._tmp / LOGPROBS_FILE, "wb")
        self._id_fh = open(self._tmp / IDS_FILE, "wb")
        self._lp_hash, self._id_hash = hashlib.sha256(), hashlib.sha256()
        self._offsets: dict[str, list[int]] = {}
        self._rows = 0
        self._open = True

    @property
    def final_dir(self) -> Path:
        return self.out_dir / self.task

    def add(self, instance_id: str, logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        """Append one instance: teacher logits (L, V) at its label positions, or an already computed
        (topk_logprobs (L, k), topk_ids (L, k)) pair taken from log_softmax(logits / T)."""
        if not self._open:
            raise RuntimeError(f"CacheShardWriter({self.task}) is closed")
        instance_id = str(instance_id)
        if instance_id in self._offsets:
            raise DataError(f"cache shard {self.task}: instance id {instance_id!r} added twice")
        if isinstance(logits, tuple):
            lp, ids = logits
        else:
            lp, ids = self._topk(logits)
        lp, ids = lp.detach(), ids.detach()
        if lp.dim() != 2 or lp.shape != ids.shape or lp.shape[1] != self.k:
            raise DataError(f"cache shard {self.task}, instance {instance_id!r}: expected top-k log-probs and ids "
                            f"of shape (L, k={self.k}), got {tuple(lp.shape)} and {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise DataError(f"cache shard {self.task}, instance {instance_id!r}: token ids outside "
                            f"[0, vocab_size={self.vocab_size})")
        lp_np = np.ascontiguousarray(lp.to(torch.float32).cpu().numpy().astype(LOGPROB_DTYPE))  # (L, k)
        id_np = np.ascontiguousarray(ids.cpu().numpy().astype(self.ids_dtype))  # (L, k)
        for fh, h, arr in ((self._lp_fh, self._lp_hash, lp_np), (self._id_fh, self._id_hash, id_np)):
            b = arr.tobytes()
            fh.write(b)
            h.update(b)
        self._offsets[instance_id] = [self._rows, self._rows + lp_np.shape[0]]
        self._rows += lp_np.shape[0]

    def _topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise DataError(f"cache shard {self.task}: expected teacher logits (L, V={self.vocab_size}), "
                            f"got {tuple(logits.shape)}")
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)  # (L, V)
        return torch.topk(logp, self.k, dim=-1, sorted=True)  # values (L, k), indices (L, k)

    def close(self) -> Path:
        """Write offsets + manifest, fsync, and rename the temp folder onto `<out_dir>/<task>`."""
        if not self._open:
            return self.final_dir
        self._open = False
        try:
            self._lp_fh.close()
            self._id_fh.close()
            (self._tmp / OFFSETS_FILE).write_text(json.dumps({"instances": self._offsets}, sort_keys=True))
            files = {
                LOGPROBS_FILE: {"sha256": self._lp_hash.hexdigest(), "bytes": (self._tmp / LOGPROBS_FILE).stat().st_size},
                IDS_FILE: {"sha256": self._id_hash.hexdigest(), "bytes": (self._tmp / IDS_FILE).stat().st_size},
                OFFSETS_FILE: {"sha256": sha256_file(self._tmp / OFFSETS_FILE),
                               "bytes": (self._tmp / OFFSETS_FILE).stat().st_size},
            }
            manifest = {**self.fields, "format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task,
                        "dtypes": {"logprobs": np.dtype(LOGPROB_DTYPE).name, "ids": self.ids_dtype.name},
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
            self._lp_fh.close()
            self._id_fh.close()
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


def check_expect(manifest: Mapping[str, Any], expect: Mapping[str, Any], where: str) -> None:
    """Raise ArtifactMismatchError naming the first field whose value differs from `expect` (both values shown)."""
    for key, want in _normalise(dict(expect)).items():
        if key not in manifest:
            raise ArtifactMismatchError(f"{where}: manifest has no field '{key}' (expected {want!r}); "
                                        f"the cache was written by another version or configuration")
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
                                        f"{self.manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}")
        check_expect(self.manifest, expect or {}, str(mpath))
        self.k = int(self.manifest["k"])
        self.temperature = float(self.manifest["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.tokens = int(self.manifest["counts"]["tokens"])
        lp_dtype = np.dtype(self.manifest["dtypes"]["logprobs"])
        id_dtype = np.dtype(self.manifest["dtypes"]["ids"])
        want_bytes = {LOGPROBS_FILE: self.tokens * self.k * lp_dtype.itemsize,
                      IDS_FILE: self.tokens * self.k * id_dtype.itemsize}
        for name in DATA_FILES:
            self._check_file(name, want_bytes.get(name), verify)
        offsets = json.loads((self.dir / OFFSETS_FILE).read_text())["instances"]
        self._offsets: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in offsets.items()}
        if len(self._offsets) != int(self.manifest["counts"]["instances"]) or any(
                not 0 <= s <= e <= self.tokens for s, e in self._offsets.values()):
            raise ArtifactMismatchError(f"{self.dir / OFFSETS_FILE}: offsets disagree with the manifest counts")
        shape = (self.tokens, self.k)
        # np.memmap refuses a zero-byte file: an empty shard gets empty in-memory arrays
        self.logprobs = (np.memmap(self.dir / LOGPROBS_FILE, dtype=lp_dtype, mode="r", shape=shape)
                         if self.tokens else np.zeros(shape, lp_dtype))
        self.ids = (np.memmap(self.dir / IDS_FILE, dtype=id_dtype, mode="r", shape=shape)
                    if self.tokens else np.zeros(shape, id_dtype))

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

    def get(self, instance_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (L, k) float32, ids (L, k) int64) of one instance."""
        s, e = self._span(instance_id)
        lp = torch.from_numpy(np.asarray(self.logprobs[s:e], dtype=np.float32))
        ids = torch.from_numpy(np.asarray(self.ids[s:e]).astype(np.int64))
        return lp, ids


def shard_is_complete(shard_dir: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> bool:
    """True when a published, intact shard for this configuration exists (a cache stage can skip the task)."""
    try:
        CacheShardReader(shard_dir, expect)
    except ArtifactMismatchError:
        return False
    return True
