"""One small function per memory / disk structure a stage holds, each citing the code it models (as it is TODAY).

Bytes, per process (a rank, an array element, or the evaluate process). When the stages change, change the
function of the structure that changed; `stages.py` only adds them up. Notation: P backbone parameters, elem the
compute dtype's bytes, W an instruction width (tokens), n tasks, N rows of a micro batch, L decoder layers.
"""
from __future__ import annotations

import math

from ..data.collate import INSTRUCTION_BUCKET, bucket_width as bucketed  # the pad widths of training and evaluation
from .shapes import Shape

# Measured here (CPU torch 2.13, transformers 5.24, glibc): RSS of a stage process once torch, transformers, peft,
# the tokenizer and the stage modules are loaded (~420 MB), + ~40 MB when DeepSpeed is imported (the hypernetwork
# stages). A CUDA process also maps the CUDA runtime, cuBLAS and cuDNN: CUDA_HOST_BYTES is an assumption (not
# measured here: no GPU in this environment), typical of torch 2.x after the first kernel.
LIBS_HOST_BYTES = 420 * 1024 ** 2
DEEPSPEED_HOST_BYTES = 40 * 1024 ** 2
CUDA_HOST_BYTES = 2 * 1024 ** 3
CUDA_CONTEXT_GPU_BYTES = 768 * 1024 ** 2  # context + cuBLAS workspace on the GPU (typical; not measured here)
PY_INT_BYTES = 28 + 8  # one token id in a Python list: an int object (ids > 256 are not cached) + the pointer
PY_LIST_BYTES = 56
INSTANCE_OBJECT_BYTES = 700  # Task / Instance dataclasses, dicts and string headers, per instance (measured: SNI)
DS_CKPT_BYTES_PER_PARAM = 14  # DeepSpeed ZeRO checkpoint of the trainable part: fp32 master + Adam m, v + 16-bit


# ------------------------------------------------------------------------------------------------ process
def process_libraries_bytes(cuda: bool, deepspeed: bool = False) -> int:
    """Interpreter + torch / transformers / peft (/ deepspeed) (+ the CUDA libraries on a GPU node): host RSS."""
    return LIBS_HOST_BYTES + (DEEPSPEED_HOST_BYTES if deepspeed else 0) + (CUDA_HOST_BYTES if cuda else 0)


def loaded_tasks_bytes(instances: int, chars_per_instance: float) -> int:
    """Every split's Task / Instance objects: `data.registry.load_run_tasks_from_config`, called by every stage
    (train tasks and the seen split share instances; the count passed is the distinct total)."""
    return int(instances * (INSTANCE_OBJECT_BYTES + 2 * chars_per_instance))


def token_lists_bytes(rows: int, tokens_per_row: float) -> int:
    """Token ids kept as Python lists (`collate.instruction_ids` cache, `teacher.encode_examples`, the multitask
    baselines' `Encoded` cache, pretrain's tokenized documents)."""
    return int(rows * (PY_LIST_BYTES + tokens_per_row * PY_INT_BYTES))


# ------------------------------------------------------------------------------------------------ backbone
def backbone_weights_bytes(params: int, elem: int) -> int:
    """A whole backbone on one device: `run/backbone.py` (teacher, cache-logits, evaluate) or the engine's set-up
    below ZeRO-3 (pretrain, finetune, baselines), at backbone.dtype."""
    return params * elem


def backbone_load_host_bytes(params: int, elem: int) -> int:
    """`from_pretrained` materialises the weights in host memory (safetensors pages are memory-mapped and count in
    RSS while they are read) before `.to(device)` / the ZeRO-3 partitioning: transient, about one copy."""
    return params * elem


def backbone_zero3_shard_bytes(params: int, elem: int, world: int) -> int:
    """Frozen backbone under ZeRO-3 (`distributed.zero3_model_context`): each rank keeps params/world; no grads,
    no optimizer states (nothing in it trains)."""
    return math.ceil(params * elem / world)


def zero3_gathered_bytes(largest_layer: int, prefetch_elems: int, elem: int, world: int) -> int:
    """ZeRO-3 all-gathers one module (+ a prefetch bucket) at a time during forward and backward. One process has
    nothing to gather (world 1: DeepSpeed keeps the parameters whole)."""
    return 0 if world == 1 else (largest_layer + prefetch_elems) * elem


def hypernet_zero3_states_bytes(params: int, largest: int, gpus_per_node: int, nodes: int) -> int:
    """Trainable hypernetwork under ZeRO-3 without offload: DeepSpeed's own estimator
    (`estimate_zero3_model_states_mem_needs`): 18 B/param over the world + 4 B x its largest layer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _cpu, gpu, _largest = estimate_zero3_model_states_mem_needs(
        total_params=params, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return int(gpu)


def deepspeed_buffers_bytes(params: int, world: int, reduce_bucket: int, elem: int, cuda: bool) -> int:
    """DeepSpeed ZeRO-3's own buffers for the trainable part (`runtime/zero/stage3.py`): the contiguous-gradients
    IPG bucket (torch.empty(reduce_bucket_size): reserved on a GPU, touched up to the gradients' size on a CPU) and
    the flat fp32 gradient partitions (torch.zeros, params/world)."""
    bucket = reduce_bucket if cuda else min(reduce_bucket, params)
    return bucket * elem + math.ceil(params / world) * 4


def optimizer_step_temporaries_bytes(params: int, world: int) -> int:
    """torch AdamW (the engine's client optimizer, foreach) on the fp32 partition makes whole-partition fp32
    temporaries (sqrt of exp_avg_sq, the update, the decoupled decay): ~3 copies during `step()` (measured on CPU:
    2.7)."""
    return 3 * 4 * math.ceil(params / world)


def hypernet_plain_states_bytes(params: int, elem: int) -> int:
    """Plain torch loop (distributed.use_deepspeed=false, `train/engine.py`): params + grads in the hypernet's dtype
    (cast to backbone.dtype) and torch AdamW's exp_avg / exp_avg_sq in the same dtype."""
    return 4 * params * elem


# ------------------------------------------------------------------------------------------------ instructions
def bucket_width(tokens: int, cap: int) -> int:
    """`train/hypernet_loop.bucket_instructions`: a micro batch's instructions are padded to its own longest,
    rounded up to a multiple of collate.INSTRUCTION_BUCKET (8); never to the run's longest. The plan sizes the widest
    batch: the cap (data.max_source_length) rounded up."""
    return bucketed(min(tokens, cap), INSTRUCTION_BUCKET)


def instruction_states_bytes(sh: Shape, n_tasks: int, width: int, elem: int, fusion: bool, arch: str) -> int:
    """A `TaskEncoding` of n tasks padded to `width` (`modeling/tagi.py encode_instructions`): pooled (n, d),
    last hidden states (n, W, d) (kept for T5 fusion, and for LLaMA too: `llama_instruction_pass` returns them),
    the mask (n, W) int64, and for LLaMA with fusion the KV prefix PER TASK: per layer K and V
    (n, kv_heads, W, head_dim) (`fusion.PrefixKV`; expanded to the rows one layer at a time, `PrefixLayer`)."""
    n = n_tasks * sh.hidden * elem + n_tasks * width * sh.hidden * elem + n_tasks * width * 8
    if arch == "llama" and fusion:
        n += llama_prefix_bytes(sh, n_tasks, width, elem)
    return n


def llama_prefix_bytes(sh: Shape, rows: int, width: int, elem: int) -> int:
    """LLaMA instruction KV prefix of `rows` tasks (or rows): L layers x (K, V) x rows x kv_width x W."""
    return sh.dec_layers * 2 * rows * sh.kv_width * width * elem


def t5_instruction_kv_bytes(sh: Shape, n_tasks: int, width: int, elem: int, lora_r: int, v_lora: bool) -> int:
    """`fusion.t5_instruction_kv`: every decoder cross-attention's K and V over the instruction states, ONCE PER
    TASK (n, heads, W, d_kv) (not per row: `split_cross_attention` reads them per task group); in training they stay
    in the autograd graph (the task's LoRA on v) for the whole forward + backward, and the LoRA keeps x @ A^T."""
    n = sh.dec_layers * 2 * n_tasks * sh.attn_width * width * elem
    if v_lora:
        n += sh.dec_layers * n_tasks * width * lora_r * elem
    return n


def instruction_pass_working_bytes(sh: Shape, n_tasks: int, width: int, elem: int, impl: str, cuda: bool) -> int:
    """One layer's no-grad working set while a micro batch's instructions run through the frozen backbone."""
    from .activations import forward_transient_bytes

    return forward_transient_bytes(sh, n_tasks, width, width, impl, elem, cuda)


def instruction_token_cache_bytes(n_tasks: int, tokens: float) -> int:
    """`FinetuneBatches._instr`: each task's instruction ids, tokenized when a batch first needs it and kept (a few
    hundred ids per task: after an epoch every task's)."""
    return token_lists_bytes(n_tasks, tokens)


# ------------------------------------------------------------------------------------------------ adapters
def generated_adapters_bytes(n_tasks: int, lora_params: int, elem: int, with_grad: bool) -> int:
    """Hypernetwork output A, B for n tasks (`hypernet.forward`, hypernet dtype = backbone.dtype) (+ gradient)."""
    return n_tasks * lora_params * elem * (2 if with_grad else 1)


def per_row_lora_bytes(rows: int, lora_params: int, tokens: int, r: int, modules: int, elem: int,
                       checkpointed: bool) -> int:
    """`kernels/reference.segmented_lora` gathers each ROW's A and B (index_select) and keeps them + x@A^T (N, T, r)
    for backward, per target module; under checkpointing only one module's copies live at a time."""
    full = rows * lora_params * elem + modules * rows * tokens * r * elem
    return full // max(1, modules) if checkpointed else full


def teacher_adapter_bytes(lora_params: int) -> int:
    """One teacher's adapter as read back (`run.peft_io.read_peft_adapter`: float32, stacked per type)."""
    return lora_params * 4


def finetune_teacher_cache_bytes(n_tasks: int, lora_params: int, cache_bytes: int) -> int:
    """`distill_step.TeacherAdapters`: teachers read ahead of their step by a background thread into an LRU bounded
    in BYTES (finetune.teacher_cache_gib), never more than the run's teachers (+ the one being read)."""
    one = teacher_adapter_bytes(lora_params)
    return min(n_tasks * one, cache_bytes + one)


def evaluate_teacher_group(units: int, tasks_per_batch: int, group_bytes: int, lora_params: int) -> int:
    """Teachers of one evaluation unit (`eval/shards.work_units`): at most eval.tasks_per_batch tasks and at most
    eval.teacher_group_bytes of adapter files (a single larger one alone)."""
    one = teacher_adapter_bytes(lora_params)
    return max(1, min(units, tasks_per_batch, group_bytes // max(1, one)))


def evaluate_teacher_group_bytes(group: int, lora_params: int) -> int:
    """`eval/methods.Teachers.unit`: the group's adapters read on the host, stacked there, then moved: one device
    copy (the stack); the host holds the list and the stack while it is built."""
    return group * teacher_adapter_bytes(lora_params)


def stacked_lora_train_bytes(units: int, lora_params: int) -> int:
    """`teacher_batch.StackedLora` (float32) + its gradient + AdamW exp_avg / exp_avg_sq: 16 B/param."""
    return 16 * units * lora_params


def peft_lora_train_bytes(lora_params: int) -> int:
    """The multitask baselines' PEFT LoRA (float32 on a float32 base) + gradient + AdamW states: 16 B/param."""
    return 16 * lora_params


# ------------------------------------------------------------------------------------------------ logits
def logits_bytes(rows: int, positions: int, label_positions: int, vocab: int, elem: int, fp32_copies: int) -> int:
    """Logits (rows, positions, V) in the model dtype, then the label positions gathered (a copy in the model
    dtype) and `fp32_copies` float32 tensors over them (.float(), log_softmax kept for backward, KL's softmax).
    T5: positions = the target; causal: every position, labels a subset."""
    return rows * positions * vocab * elem + rows * label_positions * vocab * (elem + 4 * fp32_copies)


# ------------------------------------------------------------------------------------------------ generation
def generation_cache_bytes(sh: Shape, arch: str, rows: int, src: int, new: int, elem: int, prefix: int = 0) -> int:
    """KV cache of greedy decoding: T5 decoder self-attention (new tokens) + cross-attention K/V over the encoder
    states (src, + the instruction when fused); LLaMA: every layer over prefix + prompt + new tokens."""
    if arch == "t5":
        return sh.dec_layers * 2 * rows * (new + src) * sh.attn_width * elem + rows * src * sh.hidden * elem
    return sh.dec_layers * 2 * rows * (prefix + src + new) * sh.kv_width * elem


# ------------------------------------------------------------------------------------------------ disk
def teacher_checkpoint_disk_bytes(units: int, lora_params: int) -> int:
    """`teacher_batch.save_checkpoint` state.pt: LoRA + AdamW exp_avg / exp_avg_sq (float32): deleted once
    published."""
    return 12 * units * lora_params


def logit_cache_disk_bytes(label_tokens: float, top_k: int, vocab: int, instances: int) -> int:
    """`distill/logit_cache.py`: per label token k float16 log-probs + k ids (uint16, int32 above 65,535 ids);
    offsets.json ~48 B per instance."""
    id_bytes = 2 if vocab <= 65535 else 4
    return int(label_tokens * top_k * (2 + id_bytes) + 48 * instances)


def hypernet_checkpoint_disk_bytes(params: int, elem: int, deepspeed: bool) -> int:
    """One resumable checkpoint of the trainable part (`train/engine.py Engine.save`): DeepSpeed ZeRO-3 with
    exclude_frozen_parameters (fp32 master, Adam m, v partitions + 16-bit params), or the plain loop's
    trainable.pt + optimizer.pt (params and two Adam states in the hypernet dtype)."""
    return params * (DS_CKPT_BYTES_PER_PARAM if deepspeed else 3 * elem)


def export_disk_bytes(params: int, elem: int) -> int:
    """`checkpoint.export_trainable`: the hypernetwork in its dtype, one safetensors file."""
    return params * elem
