"""The run's frozen backbone as every stage sees it: tokenizer, config, LoRA targets, identity and device at once,
the weights on first use; plus the one device rule and the loader of finished model folders (baselines).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ArtifactMismatchError, ConfigError, DataError
from .backbone_recipe import RECIPE_FILE, recipe, resolve_backbone_path


def resolve_device(want: str) -> torch.device:
    """`device: auto | cpu | cuda` → this process's device. CUDA means this rank's GPU (LOCAL_RANK under torchrun /
    srun), so N local ranks never pile onto cuda:0; DS_ACCELERATOR=cpu (the CPU DeepSpeed setup) forces the CPU."""
    cuda_ok = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if want == "cuda" and not cuda_ok:
        raise ConfigError("device=cuda but no CUDA device is available here (or DS_ACCELERATOR=cpu); set device=cpu "
                          "or device=auto")
    if want == "cpu" or not cuda_ok:
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    index = int(local) % torch.cuda.device_count() if local is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backbone_identity(path: str | Path) -> str:
    """A hub id as given; a built tiny backbone as `tiny:recipe:<recipe hash>` (wherever it lies: the committed
    asset or a run's own build of the same recipe are the same weights); another local folder as
    `<name>:config:<sha256 of config.json>`, so the same weights on another machine or mount point compare equal."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    rec = p / RECIPE_FILE
    if rec.is_file():
        try:
            return tiny_identity(json.loads(rec.read_text())["recipe"]["hash"])
        except (ValueError, KeyError, TypeError):
            pass
    cfg = p / "config.json"
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else "noconfig"
    return f"{p.name}:config:{digest}"


def tiny_identity(recipe_hash: str) -> str:
    return f"tiny:recipe:{recipe_hash[:16]}"


def run_backbone_identity(cfg) -> str:
    """The identity of the backbone this config resolves to, before it exists: a tiny backbone not built yet is
    named by the hash of the recipe that will build it (so a recipe change reaches every later stage's identity)."""
    path = resolve_backbone_path(cfg)
    if cfg.backbone.name_or_path == "auto" and not Path(path).is_dir():
        return tiny_identity(recipe(cfg)["hash"])
    return backbone_identity(path)


@dataclass
class LoadedBackbone:
    """The run's backbone: tokenizer, config, LoRA targets and identity at once; the weights on first use of
    `.model` (a rerun whose units are all published never loads them)."""

    tokenizer: Any
    config: Any          # the transformers model config
    arch: str
    specs: list
    path: str            # what from_pretrained was given (a PEFT adapter's base_model_name_or_path)
    identity: str        # stable id for manifests (hub id, or local folder name + config/recipe hash)
    tokenizer_hash: str
    device: torch.device
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    _model: Optional[torch.nn.Module] = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from ..kernels.dispatch import choose_attn_implementation
            from ..modeling.backbone import enable_hf_checkpointing, load_backbone

            attn = self.attn_implementation or choose_attn_implementation(self.arch, self.device)
            model, _ = load_backbone(self.path, self.arch, self.dtype, attn)
            if self.gradient_checkpointing:
                enable_hf_checkpointing(model)
            self._model = model.to(self.device)
        return self._model

    @property
    def vocab_size(self) -> int:
        """Size of the logit dimension (T5's padded 32128, not len(tokenizer))."""
        return int(self.config.vocab_size)

    @property
    def d_model(self) -> int:
        return int(self.config.d_model if self.arch == "t5" else self.config.hidden_size)


def load_run_backbone(cfg) -> LoadedBackbone:
    from transformers import AutoConfig, AutoTokenizer

    from ..distill.logit_cache import tokenizer_hash
    from ..modeling.backbone import detect_arch, target_specs

    path = resolve_backbone_path(cfg)
    if cfg.backbone.name_or_path == "auto" and not Path(path).is_dir():
        raise ArtifactMismatchError(f"{path}: no tiny backbone yet; run `tagi-ds backbone --config ...` first")
    config = AutoConfig.from_pretrained(str(path))
    arch = detect_arch(config) if cfg.backbone.arch == "auto" else cfg.backbone.arch
    tok = AutoTokenizer.from_pretrained(cfg.backbone.tokenizer or str(path))
    specs = target_specs(config, cfg.backbone.target_modules)
    b = cfg.backbone
    return LoadedBackbone(tok, config, arch, specs, str(path), backbone_identity(path), tokenizer_hash(tok),
                          resolve_device(cfg.device), b.dtype, b.attn_implementation, b.gradient_checkpointing)


def load_model_folder(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a finished model folder: a backbone / full fine-tune folder, or a PEFT adapter folder
    (its base recorded inside, loaded first). Eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model folder not found")
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, tok = load_model_folder(base_path, device)
        model = PeftModel.from_pretrained(base, str(path)).to(device)
        return model.eval(), tok
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)
