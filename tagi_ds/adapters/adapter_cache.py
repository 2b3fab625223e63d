"""Generated adapters cached on disk, so asking for the same instruction twice costs no hypernetwork forward.

Key = sha256(hypernetwork export fingerprint, instruction text, backbone id). The export fingerprint is the sha256 of
the export's config.json, which itself records the sha256 of the weights: a retrained or re-exported hypernetwork
gets new keys, never a stale adapter. Each entry is a standard PEFT adapter directory (peft_io), published
atomically, plus `tagi_cache.json` (what it was made from), so a cache entry is also a usable adapter:

    <root>/<key[:2]>/<key>/adapter_config.json, adapter_model.safetensors, tagi_cache.json

An entry that cannot be read back (truncated, another backbone's shapes) is a miss and gets rewritten.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ArtifactMismatchError
from ..io_utils import sha256_file
from ..run.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter, write_peft_adapter

CACHE_ENV = "TAGI_DS_ADAPTER_CACHE"
CACHE_META = "tagi_cache.json"
EXPORT_CONFIG = "config.json"  # train/checkpoint.EXPORT_CONFIG (not imported: adapters stay below train/)

# module_type → (A (n_layers, r, d_in), B (n_layers, d_out, r)): ONE task, the layout peft_io reads and writes.
TaskAdapters = dict[str, tuple[torch.Tensor, torch.Tensor]]


def default_cache_dir() -> Path:
    """$TAGI_DS_ADAPTER_CACHE, else ~/.cache/tagi-ds/adapters."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tagi-ds" / "adapters"


def export_fingerprint(export_dir: str | Path) -> str:
    """sha256 of the export's config.json (which holds the weights' sha256)."""
    path = Path(export_dir) / EXPORT_CONFIG
    if not path.is_file():
        raise ArtifactMismatchError(f"{path}: missing; {export_dir} is not a hypernetwork export")
    return sha256_file(path)


def cache_key(export_hash: str, instruction: str, backbone_id: str) -> str:
    """sha256 of the three parts, JSON-encoded so no concatenation of two parts can collide with another."""
    return hashlib.sha256(json.dumps([export_hash, instruction, backbone_id]).encode("utf-8")).hexdigest()


class AdapterCache:
    """The cache of one hypernetwork export on one backbone."""

    def __init__(self, root: str | Path, export_hash: str, backbone_id: str):
        self.root = Path(root)
        self.export_hash, self.backbone_id = export_hash, str(backbone_id)

    def key(self, instruction: str) -> str:
        return cache_key(self.export_hash, instruction, self.backbone_id)

    def path(self, instruction: str) -> Path:
        key = self.key(instruction)
        return self.root / key[:2] / key

    def load(self, instruction: str, specs: Sequence) -> Optional[TaskAdapters]:
        """The cached adapter (float32, CPU) of `instruction`, or None on a miss."""
        entry = self.path(instruction)
        if not ((entry / ADAPTER_CONFIG).is_file() and (entry / ADAPTER_WEIGHTS).is_file()):
            return None
        try:
            adapters, _, _ = read_peft_adapter(entry, specs)
            # read_peft_adapter reads lazily from a memory map: copy, so the entry can be replaced while in use.
            return {mt: (a.clone(), b.clone()) for mt, (a, b) in adapters.items()}
        except (ArtifactMismatchError, KeyError, ValueError):
            return None  # unreadable entry: regenerate (store() replaces it atomically)

    def store(self, instruction: str, specs: Sequence, adapters: TaskAdapters, *, r: int, alpha: float,
              task_type: str) -> Path:
        meta = {"key": self.key(instruction), "export_sha256": self.export_hash, "backbone_id": self.backbone_id,
                "instruction": instruction}
        return write_peft_adapter(self.path(instruction), specs, adapters, r=r, alpha=alpha,
                                  base_model=self.backbone_id, task_type=task_type, extra_files={CACHE_META: meta})
