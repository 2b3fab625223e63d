"""The hypernetwork export's file format: write it from gathered tensors, read it back WITHOUT DeepSpeed.

    <stage_dir>/export/
        trainable.safetensors   the hypernetwork (and the trained instruction encoder, if any), consolidated
        config.json             {"format", "config": {hypernet config, backbone id, arch, target kinds and specs,
                                fusion flag, LoRA r/alpha/scale, dtype, stage, step}, "tensors", "sha256"}

Training writes it (train/checkpoint.export_trainable gathers ZeRO-3 shards, then calls `write_export`); evaluation,
`generate-adapter` and `predict` read it. The frozen backbone is never in the export: `load_student_from_export`
loads it from the recorded backbone id (or takes one the caller already has) and checks its LoRA targets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ArtifactMismatchError
from ..io_utils import atomic_dir, sha256_file
from ..modeling.backbone import TargetSpec, load_backbone, target_specs
from ..modeling.hypernet import HyperNetwork
from ..modeling.tagi import TagiStudent

EXPORT_FORMAT = "tagi-ds hypernetwork export v1"
EXPORT_WEIGHTS = "trainable.safetensors"
EXPORT_CONFIG = "config.json"


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def export_config(student: TagiStudent, *, backbone_id: str, target_kinds: Sequence[str], r: int, alpha: float,
                  dtype: str, tokenizer: Optional[str] = None, stage: str = "", variant: Optional[str] = None,
                  step: int = 0) -> dict[str, Any]:
    """Everything `load_student_from_export` needs to rebuild the student around the exported weights."""
    return {"format": EXPORT_FORMAT, "hypernet": student.hypernet.config_dict(), "backbone_id": str(backbone_id),
            "tokenizer": str(tokenizer or backbone_id), "arch": student.arch, "fusion": bool(student.fusion),
            "train_encoder": bool(student.train_encoder), "target_modules": list(target_kinds), "r": int(r),
            "alpha": float(alpha), "lora_scale": float(student.lora_scale), "dtype": dtype, "stage": stage,
            "variant": variant, "step": int(step)}


def write_export(out_dir: str | Path, tensors: dict[str, torch.Tensor], config_dict: dict) -> Path:
    """Publish `tensors` (name → CPU tensor) and the config as an export folder, atomically."""
    from safetensors.torch import save_file

    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
        meta = {"format": "tagi-ds trainable export v1", "config": config_dict,
                "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                            for n, t in tensors.items()},
                "sha256": {EXPORT_WEIGHTS: sha256_file(tmp / EXPORT_WEIGHTS)}}
        (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return final


def load_trainable(export_dir: str | Path, module: nn.Module, *, strict: bool = True) -> dict:
    """Copy an export's weights into `module`'s trainable parameters (no DeepSpeed); return the saved config.

    strict: the export and the module must hold exactly the same trainable names and shapes.
    """
    from safetensors.torch import load_file

    d = Path(export_dir)
    cfg_path, w_path = d / EXPORT_CONFIG, d / EXPORT_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ArtifactMismatchError(f"{p}: missing; {d} is not a trainable-weights export")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactMismatchError(f"{cfg_path}: unreadable export config ({e})") from None
    want = meta.get("sha256", {}).get(EXPORT_WEIGHTS)
    if want and sha256_file(w_path) != want:
        raise ArtifactMismatchError(f"{w_path}: sha256 differs from {cfg_path} (corrupted or replaced)")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001
        raise ArtifactMismatchError(f"{w_path}: cannot be read as safetensors ({e})") from None
    params = dict(trainable_named_parameters(module))
    if strict:
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            raise ArtifactMismatchError(f"{w_path}: does not match the module: missing {missing[:5]}, "
                                        f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                continue
            if tuple(params[name].shape) != tuple(t.shape):
                raise ArtifactMismatchError(f"{w_path}: tensor '{name}' has shape {tuple(t.shape)}, the module "
                                            f"expects {tuple(params[name].shape)}")
            params[name].copy_(t.to(params[name].dtype))
    return meta.get("config", {})


def read_export_config(export_dir: str | Path) -> dict[str, Any]:
    """The `config` of an export folder; ArtifactMismatchError when it is not a hypernetwork export."""
    path = Path(export_dir) / EXPORT_CONFIG
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
    load_trainable(export_dir, holder, strict=not cfg.get("train_encoder"))
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
    load_trainable(export_dir, student, strict=True)
    dtype = next(backbone.parameters()).dtype
    student.hypernet.to(dtype)
    return student.to(device).eval()
