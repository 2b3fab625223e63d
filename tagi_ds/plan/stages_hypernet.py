"""The two hypernetwork stages (pretrain, finetune) as `train/hypernet_trainer.py` runs them today, per rank.

Phases: load (from_pretrained on every rank), instruction precompute (every rank encodes EVERY task in chunks of
16 and keeps all of them in host memory: the O(tasks) structure), and a training step (micro batch on the device).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import structures as S
from .activations import Lora, activation_bytes
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


def _model_parts(ctx: Ctx, stage: int, world: int) -> list[Part]:
    """Backbone (shard or whole), the hypernetwork's training states, the gathered working set."""
    mf, elem = ctx.mf, ctx.mf.elem
    parts = [Part("CUDA context", S.CUDA_CONTEXT_GPU_BYTES, "gpu")] if ctx.cuda else []
    if stage == 3:
        parts += [Part("backbone (ZeRO-3 shard)", S.backbone_zero3_shard_bytes(mf.params, elem, world), "gpu",
                       "--nodes", "structures.backbone_zero3_shard_bytes"),
                  Part("hypernet params + grads + optimizer (ZeRO-3)", S.hypernet_zero3_states_bytes(
                      mf.hypernet_params, mf.hypernet_largest, ctx.gpus_per_node, ctx.nodes) if world > 1 else
                      mf.hypernet_params * (2 * elem + 12), "gpu", "hypernet.hidden",
                      "structures.hypernet_zero3_states_bytes"),
                  Part("ZeRO-3 gathered layer + prefetch", S.zero3_gathered_bytes(
                      mf.largest_layer, ctx.prefetch, elem, world), "gpu", "", "structures.zero3_gathered_bytes"),
                  Part("DeepSpeed reduce bucket + fp32 gradient partitions", S.deepspeed_buffers_bytes(
                      mf.hypernet_params, world, reduce_bucket_elems(ctx.cfg.distributed.ds_config), elem, ctx.cuda),
                      "gpu", "distributed.ds_config reduce_bucket_size", "structures.deepspeed_buffers_bytes")]
    else:
        parts += [Part("backbone weights (not partitioned below ZeRO-3)", S.backbone_weights_bytes(mf.params, elem),
                       "gpu", "distributed.ds_config", "structures.backbone_weights_bytes"),
                  Part("hypernet params + grads + optimizer", S.hypernet_plain_states_bytes(mf.hypernet_params, elem)
                       if stage == 0 else mf.hypernet_params * (2 * elem + 12 // max(1, world)), "gpu",
                       "hypernet.hidden", "structures.hypernet_plain_states_bytes")]
    return parts


def _traffic(ctx: Ctx, stage: int, world: int, accum: int, chunks: int) -> tuple[int, int]:
    """(bytes each rank receives per optimizer step, during the precompute) under ZeRO-3: every micro batch gathers
    the whole backbone for forward and again for backward (the recompute of a checkpointed block reuses the gather
    of its backward), the hypernetwork likewise, and reduce-scatters the hypernetwork's gradients; each
    precompute chunk gathers the instruction pass's parameters (T5: the encoder)."""
    if stage != 3 or world == 1:
        return 0, 0
    mf, elem = ctx.mf, ctx.mf.elem
    share = (world - 1) / world
    per_micro = 2 * mf.params * elem * share + 3 * mf.hypernet_params * elem * share
    return int(accum * per_micro), int(chunks * mf.encoder_params * elem * share)


def _disk(ctx: Ctx, t: Any, stage: int, label: str) -> list[Part]:
    mf = ctx.mf
    ck = S.hypernet_checkpoint_disk_bytes(mf.hypernet_params, mf.elem, stage > 0)
    keep = max(1, t.keep_checkpoints) + 1  # the one being written while `keep` are kept
    return [Part(f"{label}: {keep} checkpoints at the peak", keep * ck, "disk", f"{label}.keep_checkpoints",
                 "structures.hypernet_checkpoint_disk_bytes"),
            Part(f"{label}: export", S.export_disk_bytes(mf.hypernet_params, mf.elem), "disk", "",
                 "checkpoint.export_trainable")]


def hypernet_stage_plan(ctx: Ctx, name: str) -> StagePlan:
    """pretrain or finetune (the config's own variant: `finetune` as `tagi`)."""
    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    elem, arch = mf.elem, mf.arch
    stage = zero_stage(cfg)
    world = ctx.world if stage > 0 else 1
    t = cfg.pretrain if name == "pretrain" else cfg.finetune
    fusion = cfg.hypernet.fusion
    ckpt = cfg.backbone.gradient_checkpointing
    if name == "pretrain":
        pre = df.pretrain
        n_tasks, k, rows = pre.docs, t.micro_batch_size, t.micro_batch_size
        w, s_in, s_tgt = pre.instr_width, pre.input_width, pre.target_width
        host_data = [Part(f"{pre.docs:,} documents, tokenized and HINT-split", S.token_lists_bytes(
            pre.docs, pre.tokens_mean) + pre.docs * (pre.chars_mean + 49) + S.token_lists_bytes(3 * pre.docs, 0),
            "host", "data.pretrain_offline_docs", "pretrain.build_data")]
        knob_tasks = "data.pretrain_offline_docs"
    else:
        tr = df.splits["train"]
        n_tasks, k = tr.tasks, t.tasks_per_batch
        rows = t.tasks_per_batch * t.instances_per_task
        w, s_in, s_tgt = tr.instr_width, tr.input_width, tr.target_width
        host_data = [Part(f"instruction token rows of {n_tasks} tasks", S.token_lists_bytes(n_tasks, tr.instr_mean),
                          "host", "", "finetune.build_data _instr_cache")]
        knob_tasks = "data.max_source_length or data.max_tasks (no knob keeps every task: issue #15)"
        if arch == "llama" and fusion:
            knob_tasks += "; hypernet.fusion=false drops the KV prefix"
    states = S.finetune_instruction_states_bytes(sh, n_tasks, w, elem, fusion, arch)
    ds = stage > 0
    host_common = host_base(ctx, tasks=name == "finetune", deepspeed=ds) + host_data  # pretrain loads no tasks
    model = _model_parts(ctx, stage, world)

    # ---------------------------------------------------------------- precompute: every task, every rank
    precompute = Phase("instruction precompute", model + host_common + [
        Part(f"outputs of a chunk of {S.ENCODE_CHUNK} instructions", S.encode_chunk_outputs_bytes(
            sh, w, elem, fusion, arch), "gpu", "", "structures.encode_chunk_outputs_bytes", cpu_alias=True),
        Part("one layer's working set in that chunk", S.encode_chunk_working_bytes(sh, w, elem, ctx.attn, ctx.cuda),
             "gpu", "", "structures.encode_chunk_working_bytes"),
        Part(f"instruction states of {n_tasks:,} tasks, two copies during torch.cat (W={w})",
             S.precompute_concat_peak_bytes(states), "host", knob_tasks,
             "structures.precompute_concat_peak_bytes")])

    # ---------------------------------------------------------------- one micro batch
    causal = arch == "llama"
    seq = s_in + s_tgt if causal and name == "finetune" else s_in  # pretrain LLaMA input_width is the sequence
    act = activation_bytes(sh, rows, w if fusion else 0, seq if causal else s_in, 0 if causal else s_tgt,
                           fusion, ctx.attn, elem, cuda=ctx.cuda,
                           lora=Lora(frozenset(cfg.backbone.target_modules), cfg.hypernet.r or cfg.lora.r))
    kl = name == "finetune" and t.lambda_kl > 0
    positions = seq if causal else s_tgt
    logits = S.logits_bytes(rows, positions, s_tgt, sh.vocab, elem, fp32_copies=2 + (2 if kl else 0))
    knob_rows = f"{name}.instances_per_task" if name == "finetune" else "pretrain.micro_batch_size"
    knob_tasks_mb = f"{name}.tasks_per_batch" if name == "finetune" else "pretrain.micro_batch_size"
    both = [
        Part(f"{k} task(s)' instruction states", S.instruction_states_bytes(sh, k, w, elem, fusion, arch), "gpu",
             knob_tasks_mb, "hypernet_trainer.encoding_for"),
        Part("generated adapters + grad", S.generated_adapters_bytes(k, mf.lora_params, elem, True), "gpu",
             knob_tasks_mb, "structures.generated_adapters_bytes"),
        Part("per-row LoRA copies", S.per_row_lora_bytes(rows, mf.lora_params, positions if causal else s_in,
                                                          cfg.hypernet.r or cfg.lora.r, mf.target_modules, elem,
                                                          ckpt), "gpu",
             "backbone.gradient_checkpointing", "structures.per_row_lora_bytes"),
    ]
    if causal and fusion:
        both.append(Part(f"prefix copied per row ({rows} rows x W={w})", S.llama_prefix_rows_bytes(sh, rows, w, elem),
                         "gpu", knob_rows, "structures.llama_prefix_rows_bytes"))
        if ckpt:
            both.append(Part("KV cache grown to W + sequence, all layers", S.llama_grown_cache_bytes(
                sh, rows, w, seq, elem), "gpu", knob_rows, "structures.llama_grown_cache_bytes"))
    host_step = host_common + [Part(f"instruction states of {n_tasks:,} tasks (W={w})", states, "host", knob_tasks,
                                    "structures.finetune_instruction_states_bytes")]
    backward_only = [Part("hypernet gradients before DeepSpeed takes them", mf.hypernet_params * elem, "gpu",
                          "hypernet.hidden", "autograd .grad of the trainable parameters")]
    if name == "finetune" and (t.lambda_ins > 0 or t.online_teacher):
        host_step.append(Part(f"teacher adapters, LRU of {min(S.TEACHER_CACHE_SIZE, n_tasks)}",
                              S.finetune_teacher_cache_bytes(n_tasks, mf.teacher_lora_params), "host", "",
                              "structures.finetune_teacher_cache_bytes"))
        both.append(Part("L_ins: one teacher on the device + float64 factors",
                         S.teacher_adapter_bytes(mf.teacher_lora_params) + 2 * mf.lora_params * 8 //
                         max(1, len(mf.targets)), "gpu", "", "finetune.l_ins_sum"))
    logits_part = Part("logits + fp32 copies (CE" + (", KL)" if kl else ")"), logits, "gpu", knob_rows,
                       "structures.logits_bytes")
    steps = train_phases("micro batch", model + host_step, act, ckpt, logits_part,
                         knob_rows if ckpt else "backbone.gradient_checkpointing", both, backward_only)
    opt = Phase("optimizer step", model + [Part("AdamW temporaries", S.optimizer_step_temporaries_bytes(
        mf.hypernet_params, world if stage > 0 else 1), "gpu", "hypernet.hidden",
        "structures.optimizer_step_temporaries_bytes")] + host_step)
    load = Phase("load", host_base(ctx, mf.elem, tasks=name == "finetune", deepspeed=ds) + host_data)

    chunks = S.encode_chunks(n_tasks)
    accum = t.grad_accum
    gather, startup = _traffic(ctx, stage, world, accum, chunks)
    variants = 1
    if name == "finetune":
        variants = max(1, len([m for m in cfg.eval.methods if m in HYPERNET_METHODS]))
        fwd = forward_flops(mf, rows, df.splits["train"].input_mean, df.splits["train"].target_mean,
                            cross=df.splits["train"].input_mean + (w if fusion else 0)) if not causal else \
            forward_flops(mf, rows, 0, df.splits["train"].input_mean + df.splits["train"].target_mean,
                          prefix=w if fusion else 0)
    else:
        fwd = forward_flops(mf, rows, s_in, s_tgt, cross=s_in + w) if not causal else \
            forward_flops(mf, rows, 0, s_in, prefix=w)
    enc_fwd = forward_flops(mf, S.ENCODE_CHUNK, w, 0, logits_positions=0) if not causal else \
        forward_flops(mf, S.ENCODE_CHUNK, 0, w, logits_positions=0)
    flops = variants * world * (t.steps * accum * train_flops(fwd, ckpt) + chunks * enc_fwd)
    layout = {0: "one process (plain torch loop)", 3: f"ZeRO-3 over {world} ranks"}.get(stage, f"ZeRO-{stage} "
                                                                                        f"over {world} ranks")
    disk = _disk(ctx, t, stage, name)
    if variants > 1:
        disk = [Part(f"{p.name} (x{variants} variants)", p.bytes * variants, "disk", p.knob, p.code) for p in disk]
    notes = []
    if stage == 0 and ctx.world > 1:
        notes.append("distributed.use_deepspeed=false: one process only; the other GPUs idle")
    plan = StagePlan(name, bool(t.enabled), layout, world, [load, precompute, *steps, opt], disk,
                     first_step_forwards=chunks + accum, gather_bytes_per_step=gather, startup_gather_bytes=startup,
                     flops=flops, steps=t.steps, notes=notes)
    return plan
