"""Load and freeze the backbone; list the linear layers that receive LoRA, from the model config alone.

Target shapes come from the config, never from `param.shape`: under ZeRO-3 a partitioned weight has shape [0].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from ..errors import ConfigError

Arch = Literal["t5", "llama"]
KINDS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
T5_TYPES = ("t5", "mt5")
# Decoder-only families with LLaMA's module names (q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/down_proj).
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")


@dataclass(frozen=True)
class TargetSpec:
    """One linear layer that receives a LoRA adapter."""

    name: str  # full module path, e.g. "encoder.block.0.layer.0.SelfAttention.q" / "model.layers.3.self_attn.q_proj"
    module_type: str  # e.g. "enc_self.q", "dec_self.q", "dec_cross.q", "enc_ffn.ffn_in", "self.q", "ffn.ffn_out"
    kind: str  # q, k, v, o, ffn_in, ffn_out
    layer: int  # index within its module_type (gated FFNs: two ffn_in linears per block → 2*block, 2*block+1)
    d_in: int
    d_out: int


def detect_arch(model_config) -> Arch:
    """'t5' for T5/mT5 configs, 'llama' for decoder-only families with LLaMA's projection names."""
    model_type = getattr(model_config, "model_type", None)
    if model_type in T5_TYPES:
        return "t5"
    if model_type in LLAMA_TYPES:
        return "llama"
    raise ConfigError(
        f"backbone.arch: cannot detect the architecture of model_type={model_type!r}; "
        f"expected one of {T5_TYPES + LLAMA_TYPES} (or set backbone.arch to t5/llama explicitly)"
    )


def freeze(model: nn.Module) -> nn.Module:
    """Every parameter requires_grad=False and eval mode (no dropout): the backbone never trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


# The frozen backbone never drops out: with HF activation checkpointing (teachers, baselines) it must sit in train()
# mode for the recompute, which used to switch T5's dropout (0.1) on exactly when checkpointing was on. Dropout is a
# property of what trains (the LoRA's own `lora.dropout`), not of the frozen weights.
NO_DROPOUT = {"t5": {"dropout_rate": 0.0}, "llama": {"attention_dropout": 0.0}}


def load_backbone(name_or_path: str, arch: str = "auto", dtype: str = "float32",
                  attn_implementation: str | None = None) -> tuple[nn.Module, Arch]:
    """from_pretrained the backbone (T5ForConditionalGeneration or AutoModelForCausalLM), frozen, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, T5ForConditionalGeneration

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"backbone.dtype: expected float32/bfloat16/float16, got {dtype!r}")
    if arch == "auto":
        arch = detect_arch(AutoConfig.from_pretrained(name_or_path))
    if arch not in ("t5", "llama"):
        raise ConfigError(f"backbone.arch: expected auto/t5/llama, got {arch!r}")
    kw = {"dtype": torch_dtype, **NO_DROPOUT[arch]}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    cls = T5ForConditionalGeneration if arch == "t5" else AutoModelForCausalLM
    model = cls.from_pretrained(name_or_path, **kw)
    return freeze(model), arch  # type: ignore[return-value]


def _check_kinds(kinds: Sequence[str]) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"backbone.target_modules: unknown kind(s) {bad or '(empty list)'}; choose from {list(KINDS)}")


def _t5_specs(cfg, kinds: Sequence[str]) -> list[TargetSpec]:
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    attn_dims = {"q": (d, inner), "k": (d, inner), "v": (d, inner), "o": (inner, d)}
    gated = bool(getattr(cfg, "is_gated_act", False))
    wi_names = ("wi_0", "wi_1") if gated else ("wi",)
    n_dec = cfg.num_decoder_layers if cfg.num_decoder_layers is not None else cfg.num_layers
    # (stack, n_layers, [(sublayer index, attention attribute, group)], ffn sublayer index, ffn group)
    stacks = [("encoder", cfg.num_layers, [(0, "SelfAttention", "enc_self")], 1, "enc_ffn"),
              ("decoder", n_dec, [(0, "SelfAttention", "dec_self"), (1, "EncDecAttention", "dec_cross")], 2, "dec_ffn")]
    specs: list[TargetSpec] = []
    for stack, n_layers, attns, ffn_idx, ffn_group in stacks:
        for sub, attr, group in attns:
            for kind in ("q", "k", "v", "o"):
                if kind in kinds:
                    for i in range(n_layers):
                        specs.append(TargetSpec(f"{stack}.block.{i}.layer.{sub}.{attr}.{kind}", f"{group}.{kind}",
                                                kind, i, *attn_dims[kind]))
        if "ffn_in" in kinds:
            for i in range(n_layers):
                for j, wi in enumerate(wi_names):
                    specs.append(TargetSpec(f"{stack}.block.{i}.layer.{ffn_idx}.DenseReluDense.{wi}",
                                            f"{ffn_group}.ffn_in", "ffn_in", i * len(wi_names) + j, d, ff))
        if "ffn_out" in kinds:
            for i in range(n_layers):
                specs.append(TargetSpec(f"{stack}.block.{i}.layer.{ffn_idx}.DenseReluDense.wo",
                                        f"{ffn_group}.ffn_out", "ffn_out", i, ff, d))
    return specs


def _llama_specs(cfg, kinds: Sequence[str]) -> list[TargetSpec]:
    h, n_heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    ff, n_layers = cfg.intermediate_size, cfg.num_hidden_layers
    table = {  # kind → [(path suffix, d_in, d_out)] per decoder layer
        "q": [("self_attn.q_proj", h, n_heads * head_dim)],
        "k": [("self_attn.k_proj", h, n_kv * head_dim)],
        "v": [("self_attn.v_proj", h, n_kv * head_dim)],
        "o": [("self_attn.o_proj", n_heads * head_dim, h)],
        "ffn_in": [("mlp.gate_proj", h, ff), ("mlp.up_proj", h, ff)],
        "ffn_out": [("mlp.down_proj", ff, h)],
    }
    specs: list[TargetSpec] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        group = "ffn" if kind.startswith("ffn") else "self"
        mods = table[kind]
        for i in range(n_layers):
            for j, (suffix, d_in, d_out) in enumerate(mods):
                specs.append(TargetSpec(f"model.layers.{i}.{suffix}", f"{group}.{kind}", kind,
                                        i * len(mods) + j, d_in, d_out))
    return specs


def target_specs(model_config, kinds: Sequence[str]) -> list[TargetSpec]:
    """The LoRA targets of `kinds` for this config, grouped by module type, layers in order within each type."""
    _check_kinds(kinds)
    arch = detect_arch(model_config)
    return _t5_specs(model_config, kinds) if arch == "t5" else _llama_specs(model_config, kinds)


def module_types(specs: Sequence[TargetSpec]) -> list[str]:
    """Module types in first-seen order (stable across runs: it indexes the hypernetwork's type embedding)."""
    seen: dict[str, None] = {}
    for s in specs:
        seen.setdefault(s.module_type, None)
    return list(seen)


def enable_hf_checkpointing(backbone: torch.nn.Module, enabled: bool = True) -> None:
    """Non-reentrant gradient checkpointing of a transformers backbone by transformers itself (a switch): for plain
    backbones (teachers, baselines); the TAGI student has its own (modeling/checkpointing.py).

    Non-reentrant (use_reentrant=False) because the backbone is frozen: the reentrant variant drops the gradient
    of a checkpointed block whose inputs do not require grad, which would cut the LoRA terms' gradients.
    transformers only recomputes when the backbone is in train() mode; the KV cache is turned off.
    """
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(backbone).__name__} does not support gradient checkpointing "
                          f"(backbone.gradient_checkpointing)")
    if not enabled:
        backbone.gradient_checkpointing_disable()
        return
    if getattr(backbone, "config", None) is not None:
        backbone.config.use_cache = False
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
