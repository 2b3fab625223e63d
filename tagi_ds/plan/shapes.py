"""Shape facts of a run's models, without weights: the backbone and the hypernetwork built on the meta device.

Everything the byte formulas need about the models comes from here (`model_facts(cfg)`):
- backbone: parameter count, the largest single module (what ZeRO-3 gathers at once), the encoder's share (T5
  instruction passes run the encoder alone), widths for the activation formula (`Shape`);
- LoRA targets from the config (`modeling.backbone.target_specs`): parameters of one task's adapter at the
  teachers' rank (lora.r) and at the generated rank (hypernet.r or lora.r);
- hypernetwork: parameter count and largest layer, built on the meta device from `modeling.hypernet`;
- dtypes: the compute dtype (backbone.dtype) and the dtype the checkpoint is stored in, which is what
  `from_pretrained` without a dtype gives in transformers 5 ("auto": the multitask baselines load it that way).
A local backbone folder is read from its config.json; a known hub id comes from `modeling.known_configs` (offline).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What `from_pretrained(path)` (dtype "auto") gives for hub checkpoints that are not on disk here: the dtype their
# public config.json / weights carry (T5 LM-adapt ships float32 weights; LLaMA-2 declares float16; LLaMA-3 bfloat16).
HUB_CHECKPOINT_DTYPE = {
    "google/t5-xl-lm-adapt": "float32",
    "google/t5-large-lm-adapt": "float32",
    "meta-llama/Llama-2-7b-hf": "float16",
    "meta-llama/Meta-Llama-3-8B": "bfloat16",
}


# ------------------------------------------------------------------------------------------------- backbone
def build_meta_backbone(model_config: Any, arch: str) -> Any:
    """The backbone as a module on the meta device: real shapes, no storage, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    with torch.device("meta"):
        if arch != "t5":
            return AutoModelForCausalLM.from_config(model_config)
        model = T5ForConditionalGeneration(model_config)
        # T5 v1.1 / LM-adapt checkpoints keep an lm_head separate from the shared embedding. transformers 5 builds
        # T5 tied and unties at from_pretrained when the checkpoint's two matrices differ; do the same here (the
        # config marks v1.1 by not scaling decoder outputs), or the plan would miss vocab x d_model parameters.
        if not getattr(model_config, "scale_decoder_outputs", True) and model.lm_head.weight is model.shared.weight:
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        return model


def count_params(module: Any) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def largest_layer_params(module: Any) -> int:
    """The most parameters any one module owns directly: what ZeRO-3 gathers at once (DeepSpeed's definition)."""
    best, seen = 0, set()
    for m in module.modules():
        n = 0
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        best = max(best, n)
    return best


@dataclass
class Shape:
    """What the activation formula needs from a backbone config."""

    arch: str
    hidden: int
    heads: int
    attn_width: int  # heads x head_dim
    kv_width: int  # kv_heads x head_dim (LLaMA GQA; T5: = attn_width)
    ffn: int
    ffn_saved: int  # T x ffn tensors one FFN sublayer saves (see activations.ffn_bytes)
    enc_layers: int
    dec_layers: int
    vocab: int
    dropout: float = 0.0  # T5 dropout_rate: active whenever the backbone is in train() mode


def backbone_shape(model_config: Any, arch: str) -> Shape:
    c = model_config
    if arch == "t5":
        n_dec = c.num_decoder_layers if c.num_decoder_layers is not None else c.num_layers
        a = c.num_heads * c.d_kv
        gated = bool(getattr(c, "is_gated_act", False))
        # T5 v1.1's gelu_new is composed of elementwise ops: it saves 4 tensors of T x d_ff, the gate product 2
        # more, wo its input 1 (measured with saved_tensors_hooks, tests/plan/test_activations.py). Plain ReLU: 2.
        return Shape("t5", c.d_model, c.num_heads, a, a, c.d_ff, 7 if gated else 2, c.num_layers, n_dec,
                     c.vocab_size, float(getattr(c, "dropout_rate", 0.0) or 0.0))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    # SwiGLU: SiLU input, the two product operands, down_proj's input.
    return Shape("llama", c.hidden_size, c.num_attention_heads, c.num_attention_heads * head_dim, n_kv * head_dim,
                 c.intermediate_size, 4, 0, c.num_hidden_layers, c.vocab_size,
                 float(getattr(c, "attention_dropout", 0.0) or 0.0))


# ------------------------------------------------------------------------------------------------ all facts
@dataclass
class ModelFacts:
    name: str  # what the config names (hub id or folder)
    arch: str
    config: Any = field(repr=False)
    shape: Shape
    params: int  # distinct backbone parameters
    largest_layer: int  # params of the largest single module (embedding / lm_head)
    encoder_params: int  # T5: encoder + shared embedding (the instruction pass); LLaMA: all but lm_head
    targets: list[dict]  # one row per module type: kind, count, d_in, d_out, lora params at the generated rank
    target_modules: int
    lora_params: int  # one task's generated adapter (hypernet.r or lora.r)
    teacher_lora_params: int  # one teacher's adapter (lora.r)
    hypernet_params: int
    hypernet_largest: int
    compute_dtype: str  # backbone.dtype: what the stages load it as
    checkpoint_dtype: str  # what from_pretrained(path) gives without a dtype (the multitask baselines)
    local_dir: str | None  # the backbone folder when it is on disk (tokenizer, config.json)

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def checkpoint_elem(self) -> int:
        return DTYPE_BYTES[self.checkpoint_dtype]


def _hidden(model_config: Any) -> int:
    return int(getattr(model_config, "d_model", None) or model_config.hidden_size)


def backbone_location(cfg: Any) -> str:
    """backbone.name_or_path, with 'auto' resolved the way the stages resolve it (committed asset or run folder)."""
    if cfg.backbone.name_or_path != "auto":
        return cfg.backbone.name_or_path
    try:
        from ..train.backbone_stage import resolve_backbone_path

        return str(resolve_backbone_path(cfg))
    except Exception:  # noqa: BLE001 - the stage module moves; the run folder is where it builds the backbone
        return str(Path(cfg.run_dir) / "backbone")


def _checkpoint_dtype(location: str, model_config: Any) -> str:
    """The dtype `from_pretrained(location)` gives in transformers 5 (dtype "auto": config.dtype, else weights)."""
    if location in HUB_CHECKPOINT_DTYPE:
        return HUB_CHECKPOINT_DTYPE[location]
    cfg_path = Path(location) / "config.json"
    if cfg_path.is_file():
        d = json.loads(cfg_path.read_text())
        v = d.get("dtype") or d.get("torch_dtype")
        if v in DTYPE_BYTES:
            return v
    v = getattr(model_config, "dtype", None)
    name = str(v).replace("torch.", "") if v is not None else "float32"
    return name if name in DTYPE_BYTES else "float32"


def model_facts(cfg: Any) -> ModelFacts:
    """Shapes, counts and dtypes of the run's backbone and hypernetwork (meta device: seconds, nothing read)."""
    import torch

    from ..modeling.backbone import detect_arch, target_specs
    from ..modeling.hypernet import HyperNetwork
    from ..modeling.known_configs import resolve_config

    location = backbone_location(cfg)
    if cfg.backbone.name_or_path == "auto" and not Path(location).is_dir():
        raise ConfigError(f"backbone.name_or_path is auto but {location} holds no backbone yet; build it with "
                          f"`tagi-ds backbone --config ...`, or plan with backbone.name_or_path=<folder or hub id>")
    mcfg = resolve_config(location)
    arch = detect_arch(mcfg) if cfg.backbone.arch == "auto" else cfg.backbone.arch
    if cfg.backbone.dtype not in DTYPE_BYTES:
        raise ConfigError(f"backbone.dtype: expected one of {sorted(DTYPE_BYTES)}, got {cfg.backbone.dtype!r}")
    model = build_meta_backbone(mcfg, arch)
    params, largest = count_params(model), largest_layer_params(model)
    if arch == "t5":
        enc = count_params(model.encoder)  # includes the shared embedding it reads
    else:
        enc = params - count_params(model.lm_head) if model.lm_head.weight is not model.get_input_embeddings().weight \
            else params
    del model

    specs = target_specs(mcfg, list(cfg.backbone.target_modules))
    r_gen, r_teacher = cfg.generated_rank, cfg.lora.r
    rows: dict[str, dict[str, Any]] = {}
    for s in specs:
        row = rows.setdefault(s.module_type, {"module_type": s.module_type, "kind": s.kind, "count": 0,
                                              "d_in": s.d_in, "d_out": s.d_out, "lora_params": 0})
        row["count"] += 1
        row["lora_params"] += r_gen * (s.d_in + s.d_out)
    with torch.device("meta"):
        hyper = HyperNetwork(specs, _hidden(mcfg), r_gen, hidden=cfg.hypernet.hidden,
                             trunk_layers=cfg.hypernet.trunk_layers, embed_dim=cfg.hypernet.embed_dim)
    local = location if Path(location).is_dir() else None
    return ModelFacts(
        name=location, arch=arch, config=mcfg, shape=backbone_shape(mcfg, arch), params=params, largest_layer=largest,
        encoder_params=enc, targets=list(rows.values()), target_modules=len(specs),
        lora_params=sum(r["lora_params"] for r in rows.values()),
        teacher_lora_params=sum(r_teacher * (s.d_in + s.d_out) for s in specs),
        hypernet_params=count_params(hyper), hypernet_largest=largest_layer_params(hyper),
        compute_dtype=cfg.backbone.dtype, checkpoint_dtype=_checkpoint_dtype(location, mcfg), local_dir=local)
