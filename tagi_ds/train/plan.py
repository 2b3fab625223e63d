"""`tagi-ds plan --config X --nodes N --gpus-per-node G [--json]`: per-GPU memory of a scale run, on any machine.

The backbone and the hypernetwork are built on the meta device (shapes only: no weights, no download, seconds),
then memory is accounted per GPU for a world of N x G ranks under DeepSpeed ZeRO-3:

- frozen backbone: parameters only, partitioned over all ranks (bytes = params x dtype / world). No gradients,
  no optimizer states: nothing in it trains. DeepSpeed's estimator would charge it 18 bytes/param as if it trained.
- trainable hypernetwork: DeepSpeed's own ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`, the function
  behind `estimate_zero3_model_states_mem_needs_all_cold`): 18 bytes/param over the world (bf16 param + bf16 grad
  + fp32 master, Adam m and v, + DeepSpeed's buffer) plus 4 bytes x its largest layer (gathered param + grad).
- gathered working set: ZeRO-3 all-gathers one layer (plus a prefetch bucket) of the backbone at a time.
- activations: analytic (below), for the stage's micro batch, with and without activation checkpointing.

Activation formula (elements, times the compute dtype's bytes unless stated), per layer, for T tokens of micro batch B, query
length s_q, key length s_k, hidden h, attention width a = heads x head_dim, key/value width a_kv, FFN width f:
  attention sublayer  2Th (norm in, norm out) + 2Ta (Q, context) + 2·B·s_k·a_kv (K, V)
                      + B·heads·s_q·s_k (probabilities, eager attention only; sdpa/flash keep no s² tensor;
                      eager softmax saves fp32 probabilities plus a cast copy: 4 + dtype bytes each)
                      + the norm in front: fp32 copy, input, normalized, output: T·h·(4 + 3·dtype) bytes
  FFN sublayer        2Th + k·Tf: k = 4 for SwiGLU (SiLU input, both product operands, down input), 7 for
                      T5 v1.1's GEGLU (its tanh-GELU is composed of elementwise ops that save 4 tensors), 2 plain
  T5 decoder layers add a cross-attention sublayer with s_k = instruction + input length (fusion).
This is an upper bound: it counts every linear layer's input as saved, while autograd skips saving inputs of a
frozen linear with no LoRA. Dropout masks are absent (the frozen backbone runs in eval mode). With non-reentrant
checkpointing per layer, each layer keeps only its input (T·h) and one layer's activations live during recompute.
Logits: bf16 logits plus two fp32 log-softmax copies (CE and KL) over the vocabulary at every scored position.
CUDA context (~0.5-1 GiB), allocator fragmentation and NCCL buffers come on top.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DS_DEFAULT_PREFETCH = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size (elements)


# ------------------------------------------------------------------------------------------------- models
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


def _hidden(model_config: Any) -> int:
    return int(getattr(model_config, "d_model", None) or model_config.hidden_size)


@dataclass
class Shape:
    """What the activation formula needs from a backbone config."""

    arch: str
    hidden: int
    heads: int
    attn_width: int
    kv_width: int
    ffn: int
    ffn_saved: int  # T x ffn tensors one FFN sublayer saves (see ffn_elems)
    enc_layers: int
    dec_layers: int
    vocab: int


def backbone_shape(model_config: Any, arch: str) -> Shape:
    c = model_config
    if arch == "t5":
        n_dec = c.num_decoder_layers if c.num_decoder_layers is not None else c.num_layers
        a = c.num_heads * c.d_kv
        gated = bool(getattr(c, "is_gated_act", False))
        # T5 v1.1's gelu_new is composed of elementwise ops: it saves 4 tensors of T x d_ff, the gate product 2
        # more, wo its input 1 (measured with saved_tensors_hooks, tests/train/test_plan.py). Plain ReLU: 2.
        return Shape("t5", c.d_model, c.num_heads, a, a, c.d_ff, 7 if gated else 2, c.num_layers, n_dec, c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    # SwiGLU: SiLU input, the two product operands, down_proj's input.
    return Shape("llama", c.hidden_size, c.num_attention_heads, c.num_attention_heads * head_dim, n_kv * head_dim,
                 c.intermediate_size, 4, 0, c.num_hidden_layers, c.vocab_size)


# ----------------------------------------------------------------------------------------------- formulas
def norm_bytes(t: int, sh: Shape, elem: int) -> int:
    """RMSNorm (T5 / LLaMA) upcasts to fp32: it saves an fp32 copy of its input, the input, the normalized
    value and its output (the next linear's input) in the compute dtype: T·h·(4 + 3·elem) bytes at most."""
    return t * sh.hidden * (4 + 3 * elem)


def attention_bytes(b: int, s_q: int, s_k: int, sh: Shape, eager: bool, elem: int) -> int:
    """Saved bytes of one attention sublayer with its norm (see the module docstring)."""
    t = b * s_q
    n = (2 * t * sh.attn_width + 2 * b * s_k * sh.kv_width) * elem
    if eager:
        # Eager softmax runs in fp32 and is cast back: fp32 probabilities + a compute-dtype copy per element.
        n += b * sh.heads * s_q * s_k * (4 + elem if elem < 4 else 4)
    return norm_bytes(t, sh, elem) + n


def ffn_bytes(b: int, s: int, sh: Shape, elem: int) -> int:
    t = b * s
    return norm_bytes(t, sh, elem) + sh.ffn_saved * t * sh.ffn * elem


def activation_bytes(sh: Shape, batch: int, s_instr: int, s_in: int, s_tgt: int, fusion: bool, eager: bool,
                     elem: int) -> dict[str, int]:
    """Activation bytes of one micro batch: layers without / with checkpointing, and the logits.

    T5: encoder over the input (s_in); decoder over the target (s_tgt) with cross-attention over the encoder
    states, concatenated with the instruction states when `fusion`. LLaMA: one causal stack over input + target,
    attending to an instruction KV prefix (s_instr) when `fusion`. Each stack ends in one more norm.
    """
    layers: list[int] = []  # saved bytes per layer
    inputs: list[int] = []  # bytes of each layer's input (what checkpointing keeps)
    extra = 0  # stack-level tensors: final norms, the cross-attention source shared by all decoder layers
    if sh.arch == "t5":
        enc = attention_bytes(batch, s_in, s_in, sh, eager, elem) + ffn_bytes(batch, s_in, sh, elem)
        layers += [enc] * sh.enc_layers
        inputs += [batch * s_in * sh.hidden * elem] * sh.enc_layers
        s_cross = s_in + (s_instr if fusion else 0)
        dec = (attention_bytes(batch, s_tgt, s_tgt, sh, eager, elem)
               + attention_bytes(batch, s_tgt, s_cross, sh, eager, elem) + ffn_bytes(batch, s_tgt, sh, elem))
        layers += [dec] * sh.dec_layers
        inputs += [batch * s_tgt * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s_in, sh, elem) + norm_bytes(batch * s_tgt, sh, elem)
        extra += batch * s_cross * sh.hidden * elem
        scored = batch * s_tgt
    else:
        s = s_in + s_tgt
        s_k = s + (s_instr if fusion else 0)
        dec = attention_bytes(batch, s, s_k, sh, eager, elem) + ffn_bytes(batch, s, sh, elem)
        layers += [dec] * sh.dec_layers
        inputs += [batch * s * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s, sh, elem)
        scored = batch * s  # causal LMs compute logits at every position
    full = sum(layers) + extra
    ckpt = sum(inputs) + max(layers) + extra
    logits = scored * sh.vocab * (elem + 2 * 4)
    return {"layers_no_ckpt": full, "layers_ckpt": ckpt, "logits": logits}


def instruction_state_bytes(sh: Shape, tasks: int, s_instr: int, fusion: bool, elem: int) -> int:
    """Instruction states kept for the micro batch (computed once per task, no grad)."""
    if not fusion:
        return tasks * sh.hidden * elem  # just the pooled task vector
    if sh.arch == "t5":
        return tasks * s_instr * sh.hidden * elem  # encoder states the decoder cross-attends to
    return sh.dec_layers * 2 * tasks * s_instr * sh.kv_width * elem  # a KV prefix per layer


def ds_zero3_trainable(total: int, largest: int, gpus_per_node: int, nodes: int) -> int:
    """GPU bytes of a trainable model under ZeRO-3 without offload, from DeepSpeed's own estimator."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _cpu, gpu, _largest = estimate_zero3_model_states_mem_needs(
        total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return int(gpu)


def _prefetch_bucket(ds_config: str) -> int:
    """stage3_prefetch_bucket_size from the ds config when it is a number, else DeepSpeed's default."""
    path = Path(ds_config)
    if path.is_file():
        try:
            v = json.loads(path.read_text()).get("zero_optimization", {}).get("stage3_prefetch_bucket_size")
        except (OSError, json.JSONDecodeError):
            v = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return DS_DEFAULT_PREFETCH


# -------------------------------------------------------------------------------------------------- plan
def make_plan(cfg: Any, nodes: int, gpus_per_node: int, stage: str = "finetune") -> dict[str, Any]:
    """Everything `tagi-ds plan` prints, as a dict (bytes per GPU unless a key says otherwise)."""
    from ..modeling.backbone import detect_arch, target_specs
    from ..modeling.hypernet import HyperNetwork
    from ..modeling.known_configs import resolve_config

    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if stage not in ("finetune", "pretrain"):
        raise ConfigError(f"--stage must be finetune or pretrain, got {stage!r}")
    import torch

    world = nodes * gpus_per_node
    mcfg = resolve_config(cfg.backbone.name_or_path)
    arch = detect_arch(mcfg) if cfg.backbone.arch == "auto" else cfg.backbone.arch
    elem = DTYPE_BYTES[cfg.backbone.dtype]

    backbone = build_meta_backbone(mcfg, arch)
    bb_params = count_params(backbone)
    bb_largest = largest_layer_params(backbone)
    del backbone

    specs = target_specs(mcfg, list(cfg.backbone.target_modules))
    r = cfg.hypernet.r or cfg.lora.r
    targets: dict[str, dict[str, Any]] = {}
    for s in specs:
        row = targets.setdefault(s.module_type, {"module_type": s.module_type, "kind": s.kind, "count": 0,
                                                 "d_in": s.d_in, "d_out": s.d_out, "lora_params": 0})
        row["count"] += 1
        row["lora_params"] += r * (s.d_in + s.d_out)
    lora_per_task = sum(t["lora_params"] for t in targets.values())
    with torch.device("meta"):
        hyper = HyperNetwork(specs, _hidden(mcfg), r, hidden=cfg.hypernet.hidden,
                             trunk_layers=cfg.hypernet.trunk_layers, embed_dim=cfg.hypernet.embed_dim)
    hy_params = count_params(hyper)
    hy_largest = largest_layer_params(hyper)
    del hyper

    sh = backbone_shape(mcfg, arch)
    if stage == "finetune":
        tcfg = cfg.finetune
        tasks = tcfg.tasks_per_batch
        batch = tcfg.tasks_per_batch * tcfg.instances_per_task
        s_instr, s_in, s_tgt = cfg.data.max_source_length, cfg.data.max_input_length, cfg.data.max_target_length
    else:
        tcfg = cfg.pretrain
        tasks = batch = tcfg.micro_batch_size  # HINT split: every sequence is its own "task"
        seg = list(cfg.data.pretrain_segment_lengths)
        if len(seg) != 3:
            raise ConfigError(f"data.pretrain_segment_lengths must have 3 entries, got {seg}")
        s_instr, s_in, s_tgt = (int(x) for x in seg)
    # T5's relative position bias needs eager attention; LLaMA with sdpa/flash keeps no s x s tensor.
    eager = arch == "t5" or cfg.backbone.attn_implementation == "eager"
    act = activation_bytes(sh, batch, s_instr, s_in, s_tgt, cfg.hypernet.fusion, eager, elem)
    instr = instruction_state_bytes(sh, tasks, s_instr, cfg.hypernet.fusion, elem)
    # Generated A and B for the micro batch's tasks, fp32 (hypernet output), value + gradient.
    adapters = tasks * lora_per_task * 4 * 2

    bb_shard = math.ceil(bb_params * elem / world)
    hy_states = ds_zero3_trainable(hy_params, hy_largest, gpus_per_node, nodes)
    prefetch = _prefetch_bucket(cfg.distributed.ds_config)
    gathered = (bb_largest + prefetch) * elem
    common = bb_shard + hy_states + gathered + instr + adapters + act["logits"]
    total_no = common + act["layers_no_ckpt"]
    total_ck = common + act["layers_ckpt"]
    return {
        "config": cfg.name, "backbone": cfg.backbone.name_or_path, "arch": arch, "dtype": cfg.backbone.dtype,
        "stage": stage, "nodes": nodes, "gpus_per_node": gpus_per_node, "world_size": world,
        "backbone_params": bb_params, "backbone_largest_layer_params": bb_largest,
        "targets": list(targets.values()), "target_modules": len(specs), "lora_params_per_task": lora_per_task,
        "hypernet_params": hy_params, "hypernet_largest_layer_params": hy_largest,
        "micro_batch": {"tasks": tasks, "sequences": batch, "instruction_tokens": s_instr, "input_tokens": s_in,
                        "target_tokens": s_tgt, "grad_accum": tcfg.grad_accum,
                        "sequences_per_step": batch * tcfg.grad_accum * world},
        "activation_checkpointing_in_config": cfg.backbone.gradient_checkpointing,
        "bytes_per_gpu": {
            "backbone_params_shard": bb_shard, "backbone_grads": 0, "backbone_optimizer": 0,
            "hypernet_zero3_states": hy_states, "zero3_gathered_working_set": gathered,
            "instruction_states": instr, "generated_adapters": adapters, "logits": act["logits"],
            "activations_no_ckpt": act["layers_no_ckpt"], "activations_ckpt": act["layers_ckpt"],
            "total_no_ckpt": total_no, "total_ckpt": total_ck,
        },
    }


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_plan(p: dict[str, Any]) -> str:
    b = p["bytes_per_gpu"]
    mb = p["micro_batch"]
    lines = [
        f"plan: {p['config']} ({p['stage']}) on {p['nodes']} node(s) x {p['gpus_per_node']} GPU(s) = "
        f"{p['world_size']} ranks, ZeRO-3, {p['dtype']}",
        f"backbone   {p['backbone']} ({p['arch']}): {_count(p['backbone_params'])} params, frozen; "
        f"largest layer {_count(p['backbone_largest_layer_params'])}",
        f"hypernet   {_count(p['hypernet_params'])} trainable params; largest layer "
        f"{_count(p['hypernet_largest_layer_params'])}",
        f"targets    {p['target_modules']} linear layers; generated LoRA per task {_count(p['lora_params_per_task'])}",
        f"  {'module type':<16}{'kind':<8}{'count':>6}{'d_in':>7}{'d_out':>7}{'LoRA/task':>12}",
    ]
    for t in p["targets"]:
        lines.append(f"  {t['module_type']:<16}{t['kind']:<8}{t['count']:>6}{t['d_in']:>7}{t['d_out']:>7}"
                     f"{_count(t['lora_params']):>12}")
    lines += [
        f"micro batch per GPU: {mb['tasks']} task(s), {mb['sequences']} sequences; tokens instruction "
        f"{mb['instruction_tokens']} / input {mb['input_tokens']} / target {mb['target_tokens']}; "
        f"{mb['sequences_per_step']} sequences per optimizer step (grad_accum {mb['grad_accum']})",
        "",
        f"  {'per GPU':<44}{'GiB':>9}   note",
        f"  {'backbone parameters (ZeRO-3 shard)':<44}{_gib(b['backbone_params_shard'])}   params x dtype / world",
        f"  {'backbone gradients + optimizer states':<44}{_gib(0)}   frozen: none",
        f"  {'hypernet params+grads+optimizer (ZeRO-3)':<44}{_gib(b['hypernet_zero3_states'])}   "
        f"DeepSpeed estimator, 18 B/param / world",
        f"  {'ZeRO-3 gathered working set':<44}{_gib(b['zero3_gathered_working_set'])}   "
        f"largest layer + prefetch bucket",
        f"  {'instruction states (no grad)':<44}{_gib(b['instruction_states'])}",
        f"  {'generated adapters (value + grad)':<44}{_gib(b['generated_adapters'])}",
        f"  {'logits (bf16 + 2 fp32 log-softmax)':<44}{_gib(b['logits'])}",
        f"  {'activations, no checkpointing':<44}{_gib(b['activations_no_ckpt'])}   analytic upper bound",
        f"  {'activations, checkpointing':<44}{_gib(b['activations_ckpt'])}",
        f"  {'TOTAL without checkpointing':<44}{_gib(b['total_no_ckpt'])}",
        f"  {'TOTAL with checkpointing':<44}{_gib(b['total_ckpt'])}"
        f"   (config: gradient_checkpointing={str(p['activation_checkpointing_in_config']).lower()})",
        "  + CUDA context (~0.5-1 GiB), allocator fragmentation and NCCL buffers",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--stage", default="finetune", choices=["finetune", "pretrain"], help="which micro batch to plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.tasks_per_batch=2")


def main(args: argparse.Namespace) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.stage)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
