"""Inference export of the hypernetwork alone, and loading it back WITHOUT DeepSpeed.

    <stage_dir>/export/
        trainable.safetensors   the hypernetwork (and the trained instruction encoder, if any), consolidated
        config.json             {"format", "config": {hypernet config, backbone id, arch, target kinds and specs,
                                fusion flag, LoRA r/alpha/scale, dtype, stage, step}, "tensors", "sha256"}

The frozen backbone is never in the export: `load_student_from_export` loads it from the recorded backbone id (or
takes one the caller already has) and checks that its LoRA targets are the exported ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ArtifactMismatchError
from ..modeling.backbone import TargetSpec, load_backbone, target_specs
from ..modeling.hypernet import HyperNetwork
from ..modeling.tagi import TagiStudent
from . import checkpoint as ck

EXPORT_FORMAT = "tagi-ds hypernetwork export v1"
EXPORT_SUBDIR = "export"


def export_config(student: TagiStudent, *, backbone_id: str, target_kinds: Sequence[str], r: int, alpha: float,
                  dtype: str, tokenizer: Optional[str] = None, stage: str = "", variant: Optional[str] = None,
                  step: int = 0) -> dict[str, Any]:
    """Everything `load_student_from_export` needs to rebuild the student around the exported weights."""
    return {"format": EXPORT_FORMAT, "hypernet": student.hypernet.config_dict(), "backbone_id": str(backbone_id),
            "tokenizer": str(tokenizer or backbone_id), "arch": student.arch, "fusion": bool(student.fusion),
            "train_encoder": bool(student.train_encoder), "target_modules": list(target_kinds), "r": int(r),
            "alpha": float(alpha), "lora_scale": float(student.lora_scale), "dtype": dtype, "stage": stage,
            "variant": variant, "step": int(step)}


def export_hypernetwork(out_dir: str | Path, student: TagiStudent, config: dict[str, Any]) -> Optional[Path]:
    """Collective under ZeRO-3 (every rank calls it; weights gathered); rank 0 writes `out_dir` atomically.
    Returns the folder on rank 0, None elsewhere."""
    return ck.export_trainable(out_dir, student, config)


def read_export_config(export_dir: str | Path) -> dict[str, Any]:
    """The `config` of an export folder; ArtifactMismatchError when it is not a hypernetwork export."""
    path = Path(export_dir) / ck.EXPORT_CONFIG
    if not path.is_file():
        raise ArtifactMismatchError(f"{path}: missing; {export_dir} is not a hypernetwork export "
                                    f"(run `tagi-ds pretrain` / `tagi-ds finetune` first)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactMismatchError(f"{path}: unreadable export config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        raise ArtifactMismatchError(f"{path}: format is {cfg.get('format') if isinstance(cfg, dict) else cfg!r}, "
                                    f"expected {EXPORT_FORMAT!r}")
    return cfg


def load_hypernet_from_export(export_dir: str | Path, backend: str = "auto") -> tuple[HyperNetwork, dict]:
    """The hypernetwork alone (no backbone needed: it maps pooled task vectors to adapters) and the export config."""
    cfg = read_export_config(export_dir)
    hypernet = HyperNetwork.from_config_dict(cfg["hypernet"], backend=backend)
    holder = nn.Module()
    holder.hypernet = hypernet  # export names are "hypernet.*" (and "instruction_encoder.*" when trained)
    ck_names_ok = not cfg.get("train_encoder")
    ck.load_trainable(export_dir, holder, strict=ck_names_ok)
    return hypernet, cfg


def load_student_from_export(export_dir: str | Path, backbone: Optional[nn.Module] = None,
                             device: str | torch.device = "cpu", backend: str = "auto") -> TagiStudent:
    """Rebuild the TAGI student from an export: frozen backbone (loaded from the recorded id unless given), the
    hypernetwork with the exported weights, the same LoRA targets, scale and fusion. Never imports DeepSpeed."""
    cfg = read_export_config(export_dir)
    if backbone is None:
        backbone, _ = load_backbone(cfg["backbone_id"], cfg["arch"], cfg.get("dtype", "float32"))
    specs_saved = [TargetSpec(**s) for s in cfg["hypernet"]["specs"]]
    specs_now = target_specs(backbone.config, cfg["target_modules"])
    if specs_saved != specs_now:
        raise ArtifactMismatchError(f"{export_dir}: the backbone's LoRA targets differ from the exported ones "
                                    f"(another backbone than {cfg['backbone_id']}?)")
    hypernet = HyperNetwork.from_config_dict(cfg["hypernet"], backend=backend)
    student = TagiStudent(backbone, cfg["arch"], specs_saved, hypernet, float(cfg["lora_scale"]),
                          fusion=bool(cfg["fusion"]), train_encoder=bool(cfg["train_encoder"]), backend=backend)
    ck.load_trainable(export_dir, student, strict=True)
    dtype = next(backbone.parameters()).dtype
    student.hypernet.to(dtype)
    return student.to(device).eval()
