"""Read and write standard PEFT LoRA adapter directories from per-module-type stacked A/B tensors.

One layout everywhere (ARCHITECTURE.md): for a target module at path `name`, PEFT stores
`base_model.model.<name>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r), scale = alpha / r.
Teachers are written with this, generated adapters are exported with this, and L_ins reads teacher adapters back with
this (memory-mapped, one task at a time), so all three agree by construction.

`adapters` below means `dict[module_type, (A (n_layers, r, d_in), B (n_layers, d_out, r))]` for ONE task, where the
layer order is the order of `specs` within a module type (TargetSpec.layer).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ArtifactMismatchError
from ..io_utils import atomic_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_key(module_name: str, which: str) -> str:
    """State-dict key PEFT uses on disk (the adapter name is stripped when saving)."""
    return f"base_model.model.{module_name}.lora_{which}.weight"


def adapters_to_state_dict(specs: Sequence, adapters: dict) -> dict[str, torch.Tensor]:
    state = {}
    for spec in specs:
        a, b = adapters[spec.module_type]
        state[peft_key(spec.name, "A")] = a[spec.layer].detach().to("cpu", torch.float32).contiguous()
        state[peft_key(spec.name, "B")] = b[spec.layer].detach().to("cpu", torch.float32).contiguous()
    return state


def write_peft_adapter(out_dir: str | Path, specs: Sequence, adapters: dict, *, r: int, alpha: float,
                       base_model: str, task_type: str, extra_files: dict[str, dict] | None = None) -> Path:
    """Publish a PEFT adapter directory atomically (temp dir + rename). Returns the final path.

    `task_type`: "SEQ_2_SEQ_LM" (T5) or "CAUSAL_LM" (LLaMA). `extra_files`: JSON files written beside it
    (metrics.json, manifest.json) in the same atomic step, so a reader never sees an adapter without them.
    """
    from peft import LoraConfig

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type=task_type,
                         target_modules=sorted({s.name for s in specs}), base_model_name_or_path=base_model)
        cfg.save_pretrained(str(tmp))
        save_file(adapters_to_state_dict(specs, adapters), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def read_peft_adapter(adapter_dir: str | Path, specs: Sequence, device: str | torch.device = "cpu"
                      ) -> tuple[dict, float, int]:
    """Load (adapters, scale, r) for `specs` from a PEFT directory; tensors are read lazily from the mmapped file."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ArtifactMismatchError(f"{p}: missing; expected a PEFT adapter directory "
                                        f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    cfg = json.loads(cfg_path.read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    by_type: dict[str, tuple[list, list]] = {}
    try:
        fh = safe_open(str(weights), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ArtifactMismatchError(f"{weights}: unreadable safetensors file ({e})") from None
    with fh:
        keys = set(fh.keys())
        for spec in specs:
            ka, kb = peft_key(spec.name, "A"), peft_key(spec.name, "B")
            if ka not in keys or kb not in keys:
                raise ArtifactMismatchError(f"{weights}: no LoRA weights for target module '{spec.name}'; the adapter "
                                            f"was made for other target modules or another backbone")
            a, b = fh.get_tensor(ka), fh.get_tensor(kb)
            if a.shape != (r, spec.d_in) or b.shape != (spec.d_out, r):
                raise ArtifactMismatchError(
                    f"{weights}: '{spec.name}' has A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                    f"A ({r}, {spec.d_in}), B ({spec.d_out}, {r}) for this backbone")
            lists = by_type.setdefault(spec.module_type, ([], []))
            lists[0].append((spec.layer, a))
            lists[1].append((spec.layer, b))
    adapters = {}
    for mtype, (as_, bs) in by_type.items():
        adapters[mtype] = (torch.stack([t for _, t in sorted(as_, key=lambda x: x[0])]),
                           torch.stack([t for _, t in sorted(bs, key=lambda x: x[0])]))
    return adapters, alpha / r, r
