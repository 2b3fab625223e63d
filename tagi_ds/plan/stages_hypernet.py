"""The two hypernetwork stages (pretrain, finetune) as `train/hypernet_loop.py` + `train/engine_stage.py` run them
today, per rank.

Phases: load (from_pretrained on every rank), the micro batch's instruction pass (each micro batch encodes its OWN
tasks' instructions, padded to an 8-token bucket: nothing O(tasks) on the device or the host), and a training step.
Stage 1's text streams (`data/document_blocks.py`): one block of documents in memory. Finetune's teachers are read
ahead of their step into an LRU bounded in bytes (finetune.teacher_cache_gib). The ZeRO stage is the ds config's
(`distributed.ds_config` / `distributed.zero_stage`): below 3 the frozen backbone is whole on every GPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from . import structures as S
from .activations import Lora, activation_bytes
from .shapes import GiB
from .stage_types import Ctx, Part, Phase, StagePlan, forward_flops, train_flops, train_phases
from .stages_single import HYPERNET_METHODS, host_base

DS_DEFAULT_PREFETCH = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size (elements)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def prefetch_elems(ds_path: str) -> int:
    """stage3_prefetch_bucket_size from the ds config when it is a number, else DeepSpeed's default."""
    v = _ds_config(ds_path).get("zero_optimization", {}).get("stage3_prefetch_bucket_size")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else DS_DEFAULT_PREFETCH


def reduce_bucket_elems(ds_path: str) -> int:
    v = _ds_config(ds_path).get("zero_optimization", {}).get("reduce_bucket_size")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 500_000_000


def zero_stage(cfg: Any) -> int:
    """0 = the plain torch loop (distributed.use_deepspeed=false); else the ds config's stage (or the override)."""
    if not cfg.distributed.use_deepspeed:
        return 0
    if cfg.distributed.zero_stage is not None:
        return int(cfg.distributed.zero_stage)
    v = _ds_config(cfg.distributed.ds_config).get("zero_optimization", {}).get("stage", 3)
    return int(v) if isinstance(v, int) else 3


def hypernet_states_bytes(ctx: Ctx, stage: int, world: int) -> int:
    """The trainable hypernetwork's params + grads + optimizer states per rank. ZeRO-3: DeepSpeed's estimator
    (everything partitioned); ZeRO-1/2: 16-bit params and gradients whole, fp32 master + Adam m, v partitioned
    (ZeRO-2 also partitions the gradients: counted whole here, DeepSpeed's bucket keeps a full-size buffer during
    the reduce); the plain loop: params + grads + Adam in the hypernet's dtype."""
    mf, elem = ctx.mf, ctx.mf.elem
    if stage == 0:
        return S.hypernet_plain_states_bytes(mf.hypernet_params, elem)
    if stage == 3:
        return S.hypernet_zero3_states_bytes(mf.hypernet_params, mf.hypernet_largest, ctx.gpus_per_node,
                                             ctx.nodes) if world > 1 else mf.hypernet_params * (2 * elem + 12)
    return 2 * elem * mf.hypernet_params + math.ceil(12 * mf.hypernet_params / world)


def _model_parts(ctx: Ctx, stage: int, world: int) -> list[Part]:
    """Backbone (shard or whole), the hypernetwork's training states, the gathered working set."""
    mf, elem = ctx.mf, ctx.mf.elem
    parts = [Part("CUDA context", S.CUDA_CONTEXT_GPU_BYTES, "gpu")] if ctx.cuda else []
    states = Part(f"hypernet params + grads + optimizer ({'plain loop' if stage == 0 else f'ZeRO-{stage}'})",
                  hypernet_states_bytes(ctx, stage, world), "gpu", "hypernet.hidden",
                  "stages_hypernet.hypernet_states_bytes")
    buffers = Part("DeepSpeed reduce bucket + fp32 gradient partitions", S.deepspeed_buffers_bytes(
        mf.hypernet_params, world, reduce_bucket_elems(ctx.cfg.distributed.ds_config), elem, ctx.cuda),
        "gpu", "distributed.ds_config reduce_bucket_size", "structures.deepspeed_buffers_bytes")
    if stage == 3:
        parts += [Part("backbone (ZeRO-3 shard)", S.backbone_zero3_shard_bytes(mf.params, elem, world), "gpu",
                       "--nodes", "structures.backbone_zero3_shard_bytes"), states,
                  Part("ZeRO-3 gathered layer + prefetch", S.zero3_gathered_bytes(
                      mf.largest_layer, ctx.prefetch, elem, world), "gpu", "", "structures.zero3_gathered_bytes"),
                  buffers]
    else:
        parts += [Part("backbone weights, whole on every GPU (ZeRO below 3)", S.backbone_weights_bytes(
            mf.params, elem), "gpu", "distributed.ds_config (ZeRO-3 shards it)", "structures.backbone_weights_bytes"),
                  states] + ([buffers] if stage > 0 else [])
    return parts


def _traffic(ctx: Ctx, stage: int, world: int, accum: int) -> int:
    """Bytes each rank receives per optimizer step. ZeRO-3: every micro batch gathers the instruction pass's
    parameters (T5: the encoder; LLaMA: the decoder), then the whole backbone for forward and again for backward
    (the recompute of a checkpointed block reuses the gather of its backward), the hypernetwork likewise, and
    reduce-scatters the hypernetwork's gradients. ZeRO-1/2: the hypernetwork's gradients reduced and its updated
    parameters all-gathered, once per step; the backbone never moves."""
    if stage == 0 or world == 1:
        return 0
    mf, elem = ctx.mf, ctx.mf.elem
    share = (world - 1) / world
    if stage == 3:
        per_micro = (mf.encoder_params + 2 * mf.params) * elem * share + 3 * mf.hypernet_params * elem * share
        return int(accum * per_micro)
    return int(2 * mf.hypernet_params * elem * share)


def _disk(ctx: Ctx, t: Any, stage: int, label: str) -> list[Part]:
    mf = ctx.mf
    ck = S.hypernet_checkpoint_disk_bytes(mf.hypernet_params, mf.elem, stage > 0)
    keep = max(1, t.keep_checkpoints) + 1  # the one being written while `keep` are kept
    return [Part(f"{label}: {keep} checkpoints at the peak", keep * ck, "disk", f"{label}.keep_checkpoints",
                 "structures.hypernet_checkpoint_disk_bytes"),
            Part(f"{label}: export", S.export_disk_bytes(mf.hypernet_params, mf.elem), "disk", "",
                 "checkpoint.export_trainable")]


def _host_data(ctx: Ctx, name: str) -> tuple[list[Part], str]:
    """The stage's data in host memory, and the knob that bounds its largest structure."""
    cfg, df = ctx.cfg, ctx.df
    if name == "pretrain":
        pre, mb = df.pretrain, cfg.pretrain.micro_batch_size
        if not cfg.data.pretrain_text or cfg.data.pretrain_text == "offline":
            # train/pretrain.corpus_of: the generated corpus is a list of strings (ListCorpus), whole
            return [Part(f"offline corpus: {pre.docs:,} generated documents (strings)", pre.docs * (
                pre.chars_mean + 49), "host", "data.pretrain_offline_docs", "document_blocks.ListCorpus")], \
                "data.pretrain_offline_docs"
        return [Part(f"one block of {mb} documents (streamed) + the reader's buffer", mb * (
            pre.chars_mean + 49) + S.token_lists_bytes(3 * mb, pre.tokens_mean / 3) + (1 << 20), "host",
            "pretrain.micro_batch_size", "document_blocks.DocumentBlocks")], "pretrain.micro_batch_size"
    tr = df.splits["train"]
    return [Part(f"instruction ids of {tr.tasks} tasks (tokenized on first use)",
                 S.instruction_token_cache_bytes(tr.tasks, tr.instr_mean), "host", "",
                 "finetune.FinetuneBatches._instr")], "finetune.tasks_per_batch"


def hypernet_stage_plan(ctx: Ctx, name: str, zero: Optional[int] = None) -> StagePlan:
    """pretrain or finetune (the config's own variant: `finetune` as `tagi`); `zero` overrides the config's ZeRO
    stage (the recommendation compares 2 and 3)."""
    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    elem, arch = mf.elem, mf.arch
    stage = zero_stage(cfg) if zero is None else zero
    world = ctx.world if stage > 0 else 1
    t = cfg.pretrain if name == "pretrain" else cfg.finetune
    fusion = cfg.hypernet.fusion
    ckpt = cfg.backbone.gradient_checkpointing
    r = cfg.generated_rank
    cap = cfg.data.max_source_length
    if name == "pretrain":
        pre = df.pretrain
        k = rows = t.micro_batch_size
        w = S.bucket_width(pre.instr_width, 10 ** 9)
        s_in, s_tgt = pre.input_width, pre.target_width
        n_tasks = pre.docs
    else:
        tr = df.splits["train"]
        k, rows = t.tasks_per_batch, t.tasks_per_batch * t.instances_per_task
        w = S.bucket_width(tr.instr_width, cap)
        s_in, s_tgt = tr.input_width, tr.target_width
        n_tasks = tr.tasks
    host_data, knob_data = _host_data(ctx, name)
    ds = stage > 0
    host_common = host_base(ctx, tasks=name == "finetune", deepspeed=ds) + host_data  # pretrain loads no tasks
    model = _model_parts(ctx, stage, world)
    if name == "finetune" and t.encoding_cache_mib > 0:  # held on the device by every phase (StudentStep)
        per_task = S.instruction_states_bytes(sh, 1, w, elem, fusion, arch)
        model = model + [Part(f"instruction encodings kept across steps (LRU of {t.encoding_cache_mib:g} MiB)",
                              min(int(t.encoding_cache_mib * 2 ** 20), n_tasks * per_task), "gpu",
                              "finetune.encoding_cache_mib", "modeling/encoding_cache.EncodingCache")]
    knob_k = f"{name}.tasks_per_batch" if name == "finetune" else "pretrain.micro_batch_size"
    knob_rows = f"{name}.instances_per_task" if name == "finetune" else "pretrain.micro_batch_size"
    states = Part(f"{k} task(s)' instruction states (W={w}, an 8-token bucket)", S.instruction_states_bytes(
        sh, k, w, elem, fusion, arch), "gpu", knob_k, "structures.instruction_states_bytes")

    host_step = list(host_common)
    if name == "finetune" and (t.lambda_ins > 0 or t.lambda_kl > 0):
        cache = int(t.teacher_cache_gib * GiB)
        host_step.append(Part(f"teacher adapters read ahead (LRU of {t.teacher_cache_gib:g} GiB)",
                              S.finetune_teacher_cache_bytes(n_tasks, mf.teacher_lora_params, cache), "host",
                              "finetune.teacher_cache_gib", "structures.finetune_teacher_cache_bytes"))

    # ---------------------------------------------------------------- the micro batch's instruction pass (no grad)
    instr_pass = Phase("instruction pass (the micro batch's tasks)", model + host_step + [
        states, Part("one layer's working set", S.instruction_pass_working_bytes(sh, k, w, elem, ctx.attn, ctx.cuda),
                     "gpu", knob_k, "structures.instruction_pass_working_bytes")])

    # ---------------------------------------------------------------- one micro batch
    causal = arch == "llama"
    seq = s_in + s_tgt if causal and name == "finetune" else s_in  # pretrain LLaMA input_width is the sequence
    t5_split = arch == "t5" and fusion  # TagiStudent(cache_cross_kv=True): the instruction K/V per task
    act = activation_bytes(sh, rows, w if fusion else 0, seq if causal else s_in, 0 if causal else s_tgt,
                           fusion, ctx.attn, elem, cuda=ctx.cuda, lora=Lora(frozenset(cfg.backbone.target_modules), r),
                           t5_split_cross=t5_split)
    kl = name == "finetune" and t.lambda_kl > 0
    # LLaMA: the LM head runs over the window of positions that predict a label in some row
    # (losses.student_label_logits): the whole sequence in the worst batch (a short prompt beside a long one)
    positions = seq if causal else s_tgt
    logits = S.logits_bytes(rows, positions, s_tgt, sh.vocab, elem, fp32_copies=2 + (2 if kl else 0))
    both = [states,
            Part("generated adapters + grad", S.generated_adapters_bytes(k, mf.lora_params, elem, True), "gpu",
                 knob_k, "structures.generated_adapters_bytes"),
            Part("per-row LoRA copies", S.per_row_lora_bytes(rows, mf.lora_params, positions if causal else s_in,
                                                              r, mf.target_modules, elem, ckpt), "gpu",
                 "backbone.gradient_checkpointing", "structures.per_row_lora_bytes")]
    if t5_split:
        both.append(Part(f"instruction K/V of {k} task(s), every decoder layer", S.t5_instruction_kv_bytes(
            sh, k, w, elem, r, "v" in cfg.backbone.target_modules or "k" in cfg.backbone.target_modules), "gpu",
            knob_k, "structures.t5_instruction_kv_bytes"))
    backward_only = [Part("hypernet gradients before DeepSpeed takes them", mf.hypernet_params * elem, "gpu",
                          "hypernet.hidden", "autograd .grad of the trainable parameters")]
    if name == "finetune" and (t.lambda_ins > 0 or t.online_teacher):
        both.append(Part("L_ins: one teacher on the device + float64 factors",
                         S.teacher_adapter_bytes(mf.teacher_lora_params) + 2 * mf.lora_params * 8 //
                         max(1, len(mf.targets)), "gpu", "", "distill_step.DistillLoss l_ins"))
    logits_part = Part("logits + fp32 copies (CE" + (", KL)" if kl else ")"), logits, "gpu", knob_rows,
                       "structures.logits_bytes")
    steps = train_phases("micro batch", model + host_step, act, ckpt, logits_part,
                         knob_rows if ckpt else "backbone.gradient_checkpointing", both, backward_only)
    opt = Phase("optimizer step", model + [Part("AdamW temporaries", S.optimizer_step_temporaries_bytes(
        mf.hypernet_params, world if stage > 0 else 1), "gpu", "hypernet.hidden",
        "structures.optimizer_step_temporaries_bytes")] + host_step)
    load = Phase("load", host_base(ctx, mf.elem, tasks=name == "finetune", deepspeed=ds) + host_data)

    accum = t.grad_accum
    gather = _traffic(ctx, stage, world, accum)
    variants = 1
    if name == "finetune":
        variants = max(1, len([m for m in cfg.eval.methods if m in HYPERNET_METHODS]))
        tr = df.splits["train"]
        fwd = forward_flops(mf, rows, tr.input_mean, tr.target_mean, cross=tr.input_mean + (
            tr.instr_mean if fusion else 0)) if not causal else \
            forward_flops(mf, rows, 0, tr.input_mean + tr.target_mean, prefix=tr.instr_mean if fusion else 0)
        w_mean = tr.instr_mean
    else:
        fwd = forward_flops(mf, rows, s_in, s_tgt, cross=s_in + w) if not causal else \
            forward_flops(mf, rows, 0, s_in, prefix=w)
        w_mean = w
    enc_fwd = forward_flops(mf, k, w_mean, 0, logits_positions=0) if not causal else \
        forward_flops(mf, k, 0, w_mean, logits_positions=0)
    flops = variants * world * t.steps * accum * (train_flops(fwd, ckpt) + enc_fwd)
    layout = {0: "one process (plain torch loop)", 3: f"ZeRO-3 over {world} ranks"}.get(
        stage, f"ZeRO-{stage} over {world} ranks, backbone whole on each")
    disk = _disk(ctx, t, stage, name)
    if variants > 1:
        disk = [Part(f"{p.name} (x{variants} variants)", p.bytes * variants, "disk", p.knob, p.code) for p in disk]
    notes = []
    if stage == 0 and ctx.world > 1:
        notes.append("distributed.use_deepspeed=false: one process only; the other GPUs idle")
    # forwards before the first optimizer step: per micro batch its instruction pass + the training forward
    return StagePlan(name, bool(t.enabled), layout, world, [load, instr_pass, *steps, opt], disk,
                     first_step_forwards=2 * accum, gather_bytes_per_step=gather, flops=flops, steps=t.steps,
                     notes=notes)
