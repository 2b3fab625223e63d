"""The other stages as the code runs them today, per process (one GPU each): teacher and cache-logits (Slurm array
elements of teacher.units_per_job units, or torchrun / srun ranks each taking its share of the units), the multitask
baselines (the hypernetwork's engine: ZeRO from the ds config, bf16, activation checkpointing, several ranks) and
evaluate (sharded across ranks: each rank answers its units of tasks). Each phase lists its parts (structures.py)."""
from __future__ import annotations

import math

from . import structures as S
from .activations import Lora, activation_bytes, forward_transient_bytes
from .stage_types import Ctx, Part, Phase, StagePlan, decode_flops, forward_flops, train_flops, train_phases

HYPERNET_METHODS = ("hint", "tagi", "tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain", "tagi_no_fusion")
BASELINES = ("no_instruction", "tk_instruct")


def host_base(ctx: Ctx, load_elem: int | None = None, load_params: int | None = None,
              tasks: bool = True, deepspeed: bool = False) -> list[Part]:
    """Libraries, every split's tasks (all stages but pretrain load them), and the backbone's host copy while
    from_pretrained reads it."""
    n, chars = ctx.distinct_instances()
    parts = [Part("libraries (torch, transformers, CUDA)", S.process_libraries_bytes(ctx.cuda, deepspeed), "host", "",
                  "structures.process_libraries_bytes")]
    if tasks:
        parts.append(Part("all splits' tasks in memory", S.loaded_tasks_bytes(n, chars), "host",
                          "data.max_instances_per_task", "data.registry.load_run_tasks_from_config"))
    if load_elem is not None:
        parts.append(Part("backbone read by from_pretrained (transient)",
                          S.backbone_load_host_bytes(load_params or ctx.mf.params, load_elem), "host", "",
                          "structures.backbone_load_host_bytes"))
    return parts


def array_processes(ctx: Ctx, units: int, concurrency: int) -> int:
    return max(1, min(units, concurrency, ctx.world))


def _lora_modules(ctx: Ctx) -> int:
    return ctx.mf.target_modules


# ------------------------------------------------------------------------------------------------ teacher
def teacher_plan(ctx: Ctx) -> StagePlan:
    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    tc, elem, tr = cfg.teacher, mf.elem, df.splits["train"]
    units = df.teacher_units
    k = max(1, min(tc.tasks_per_batch, units))
    rows = k * tc.batch_size
    ckpt = cfg.backbone.gradient_checkpointing
    # teacher_batch.train: backbone.train(ckpt) -> dropout is live whenever HF checkpointing is on
    s_src, s_tgt = tr.prompt_width, tr.target_width
    lora_kinds = Lora(frozenset(cfg.backbone.target_modules), cfg.lora.r)
    act = activation_bytes(sh, rows, 0, s_src, s_tgt, False, ctx.attn, elem, dropout=ckpt, cuda=ctx.cuda,
                           lora=lora_kinds)
    causal = mf.arch == "llama"
    # LLaMA: the LM head runs over the label window (label_logits.model_label_logits): the whole sequence in the
    # worst batch (a short prompt beside a long one)
    positions = s_src + s_tgt if causal else s_tgt
    logits = S.logits_bytes(rows, positions, s_tgt, sh.vocab, elem, fp32_copies=2)
    lora_rows = S.per_row_lora_bytes(rows, mf.teacher_lora_params, positions if causal else s_src, cfg.lora.r,
                                     _lora_modules(ctx), elem, ckpt)
    weights = Part("backbone weights", S.backbone_weights_bytes(mf.params, elem), "gpu", "backbone.dtype",
                   "modeling.backbone.load_backbone")
    lora = Part(f"{k} teacher LoRA(s) + grad + AdamW (fp32)", S.stacked_lora_train_bytes(k, mf.teacher_lora_params),
                "gpu", "teacher.tasks_per_batch", "teacher_batch.StackedLora")
    cuda_ctx = [Part("CUDA context", S.CUDA_CONTEXT_GPU_BYTES, "gpu")] if ctx.cuda else []
    unit_instances = tr.instances / max(1, units)
    examples = Part("the unit's tokenized examples", S.token_lists_bytes(
        int(unit_instances) * 2, (tr.prompt_mean + tr.target_mean) / 2), "host", "", "teacher.encode_examples")
    train_ph = train_phases("training step", cuda_ctx + [weights, lora] + host_base(ctx) + [examples], act, ckpt,
                         Part("logits + fp32 CE copies", logits, "gpu", "teacher.batch_size",
                              "structures.logits_bytes"),
                         "teacher.batch_size" if ckpt else "backbone.gradient_checkpointing",
                         both=[Part("per-row LoRA copies", lora_rows, "gpu", "teacher.batch_size",
                                    "structures.per_row_lora_bytes")])
    # held-back evaluation (teacher.held_back_metrics): the trainer (LoRA + AdamW) is still alive; batches of
    # eval.batch_size over the unit's held-back (seen split) instances
    seen_split = df.splits.get("seen")
    held_rows = (seen_split.instances / max(1, seen_split.tasks)) * k * (tr.tasks / max(1, units)) if seen_split else 0
    b = max(1, min(cfg.eval.batch_size, math.ceil(held_rows)))
    new = cfg.eval.max_new_tokens
    eval_fwd = forward_transient_bytes(sh, b, s_src, s_src, ctx.attn, elem, ctx.cuda)
    eval_logits = S.logits_bytes(b, positions, s_tgt, sh.vocab, elem, fp32_copies=2)
    gen = S.generation_cache_bytes(sh, mf.arch, b, s_src, new, elem)
    held = Phase("held-back evaluation", cuda_ctx + [
        weights, lora,
        Part("evaluation forward + logits", eval_fwd + eval_logits, "gpu", "eval.batch_size",
             "teacher.evaluate_rows"),
        Part("the previous batch's logits, still referenced", eval_logits, "gpu", "eval.batch_size",
             "teacher.evaluate_rows loop variables"),
        Part("generation KV cache", gen, "gpu", "eval.batch_size", "structures.generation_cache_bytes"),
    ] + host_base(ctx) + [examples])
    load = Phase("load", host_base(ctx, elem) + [examples])
    disk = [Part(f"{units} teacher adapters (fp32 safetensors)", units * (S.teacher_adapter_bytes(
        mf.teacher_lora_params) + 8192), "disk", "teacher.group_by", "run.peft_io.write_peft_adapter"),
            Part("resumable checkpoints (deleted when published)",
                 S.teacher_checkpoint_disk_bytes(k, mf.teacher_lora_params), "disk", "",
                 "teacher_batch.save_checkpoint")]
    per_unit_rows = tc.batch_size
    fwd = forward_flops(mf, per_unit_rows, tr.prompt_mean, tr.target_mean) if mf.arch == "t5" else \
        forward_flops(mf, per_unit_rows, 0, tr.prompt_mean + tr.target_mean)
    seen = df.splits.get("seen")
    seen_rows = seen.instances if seen is not None else 0
    flops = units * tc.steps * train_flops(fwd, ckpt) + 2 * decode_flops(mf, seen_rows, tr.prompt_mean, new)
    steps = 2 * units * math.ceil(seen_rows / max(1, units) / b) * new
    per_job = max(1, tc.units_per_job)
    elements = math.ceil(units / per_job)
    procs = array_processes(ctx, elements, tc.array_concurrency)
    also = " + their logit cache (teacher.write_cache)" if tc.write_cache else ""
    return StagePlan("teacher", True, f"Slurm array: {elements} elements of {per_job} unit(s) (teacher.units_per_job)"
                     f"{also}, one GPU each, {procs} at once (or torchrun ranks, each its share)", procs,
                     [load, *train_ph, held], disk, first_step_forwards=1, flops=flops, decode_steps=steps,
                     decode_weight_bytes=mf.params * elem, decode_layers=mf.shape.dec_layers, steps=tc.steps)


# ------------------------------------------------------------------------------------------------ cache-logits
def cache_plan(ctx: Ctx) -> StagePlan:
    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    elem, tr, b = mf.elem, df.splits["train"], cfg.cache.batch_size
    causal = mf.arch == "llama"
    positions = tr.prompt_width + tr.target_width if causal else tr.target_width
    fwd = forward_transient_bytes(sh, b, tr.prompt_width + (tr.target_width if causal else 0),
                                  tr.prompt_width, ctx.attn, elem, ctx.cuda)
    enc_states = 0 if causal else b * tr.prompt_width * sh.hidden * elem
    logits = S.logits_bytes(b, positions, tr.target_width, sh.vocab, elem, fp32_copies=0)
    topk = 3 * tr.target_width * sh.vocab * 4  # CacheShardWriter._topk per instance: .float(), /T, log_softmax
    cuda_ctx = [Part("CUDA context", S.CUDA_CONTEXT_GPU_BYTES, "gpu")] if ctx.cuda else []
    step = Phase("teacher forward", cuda_ctx + [
        Part("backbone weights", S.backbone_weights_bytes(mf.params, elem), "gpu", "backbone.dtype"),
        Part("one teacher adapter (fp32)", S.teacher_adapter_bytes(mf.teacher_lora_params), "gpu", "",
             "cache_logits.run read_peft_adapter"),
        Part("forward working set (one layer)", fwd + enc_states, "gpu", "cache.batch_size",
             "activations.forward_transient_bytes"),
        Part("logits + label copy + top-k temporaries", logits + topk, "gpu", "cache.batch_size",
             "cache_logits.write_task_shard"),
        # the loop's `logits` / `lg` still hold the previous batch while the next one runs (measured)
        Part("the previous batch's logits, still referenced", logits, "gpu", "cache.batch_size",
             "cache_logits.write_task_shard loop variables"),
    ] + host_base(ctx) + [Part("one task's tokenized examples", S.token_lists_bytes(
        2 * (tr.instances // max(1, tr.tasks)), (tr.prompt_mean + tr.target_mean) / 2), "host")])
    label_tokens = tr.instances * tr.target_mean
    disk = [Part(f"logit cache: {label_tokens / 1e6:.2f}M label tokens x top-{cfg.cache.top_k}",
                 S.logit_cache_disk_bytes(label_tokens, cfg.cache.top_k, sh.vocab, tr.instances), "disk",
                 "cache.top_k", "distill.logit_cache.CacheShardWriter")]
    flops = forward_flops(mf, tr.instances, tr.prompt_mean, tr.target_mean) if not causal else \
        forward_flops(mf, tr.instances, 0, tr.prompt_mean + tr.target_mean)
    units = df.teacher_units
    per_job = max(1, cfg.teacher.units_per_job)
    procs = array_processes(ctx, math.ceil(units / per_job), cfg.teacher.array_concurrency)
    how = ("written by the teacher stage's own jobs (teacher.write_cache)" if cfg.teacher.write_cache else
           f"Slurm array: {math.ceil(units / per_job)} elements of {per_job} unit(s)")
    return StagePlan("cache-logits", True, f"{how}, one GPU each, {procs} at once (or torchrun ranks)", procs,
                     [Phase("load", host_base(ctx, elem)), step], disk, first_step_forwards=None, flops=flops)


# ------------------------------------------------------------------------------------------------ baselines
def _baseline_phases(ctx: Ctx, mode: str, stage: int, world: int) -> tuple[list[Phase], float]:
    """`train/baselines.py` on the engine: the backbone at backbone.dtype with a PEFT LoRA (cast to that dtype), HF
    activation checkpointing when backbone.gradient_checkpointing, micro batches of baselines.tasks_per_batch x
    instances_per_task built when needed (nothing cached)."""
    from .stages_hypernet import _model_parts

    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    bc, e, tr = cfg.baselines, mf.elem, df.splits["train"]
    b = bc.tasks_per_batch * bc.instances_per_task
    ckpt = cfg.backbone.gradient_checkpointing
    cap = cfg.data.max_source_length
    prompt = tr.prompt_width if mode == "tk_instruct" else min(cap, tr.input_width)
    prompt_mean = tr.prompt_mean if mode == "tk_instruct" else tr.input_mean
    causal = mf.arch == "llama"
    lora = Lora(frozenset(cfg.backbone.target_modules), cfg.lora.r)  # PEFT LoRA on the frozen base
    gather_grad = []
    if causal:  # data.collate.assemble: the prompt (capped on its own) + the answer, one sequence
        seq = prompt + tr.target_width
        act = activation_bytes(sh, b, 0, seq, 0, False, ctx.attn, e, cuda=ctx.cuda, lora=lora)
        # baselines.causal_label_logits: the LM head over the answer positions alone (N, Lt, V), never (N, L, V)
        logits = S.logits_bytes(b, tr.target_width, tr.target_width, sh.vocab, e, fp32_copies=2)
        gather_grad = [Part("the answer states' gradient over every position (index_select backward)",
                            b * seq * sh.hidden * e, "gpu", "baselines.instances_per_task",
                            "baselines.causal_label_logits")]
    else:
        act = activation_bytes(sh, b, 0, prompt, tr.target_width, False, ctx.attn, e, cuda=ctx.cuda, lora=lora)
        # T5 given labels computes HF's loss too (its log_softmax in the model dtype) besides ours (fp32)
        logits = S.logits_bytes(b, tr.target_width, tr.target_width, sh.vocab, e, fp32_copies=2) + \
            b * tr.target_width * sh.vocab * e
    states = (2 * e * mf.teacher_lora_params + math.ceil(12 * mf.teacher_lora_params / world)) if stage else \
        4 * e * mf.teacher_lora_params
    backbone = [p for p in _model_parts(ctx, stage, world) if not p.name.startswith("hypernet")]
    persistent = backbone + [
        Part(f"PEFT LoRA + grad + AdamW ({'ZeRO-' + str(stage) if stage else 'plain loop'})", states, "gpu",
             "lora.r", "train/baselines.lora_model"),
    ] + host_base(ctx, deepspeed=stage > 0) + [
        Part("the micro batch's encoded pairs", S.token_lists_bytes(b, prompt_mean + tr.target_mean), "host",
             "baselines.instances_per_task", "baselines.BaselineBatches.batch")]
    knob = "baselines.instances_per_task" if ckpt else "backbone.gradient_checkpointing"
    phases = train_phases(f"{mode} step", persistent, act, ckpt,
                          Part("logits + loss copies", logits, "gpu", "baselines.instances_per_task",
                               "structures.logits_bytes"), knob,
                          both=[Part("LoRA x @ A^T per target module", mf.target_modules * b * (
                              seq if causal else prompt) * cfg.lora.r * e // (mf.target_modules if ckpt else 1),
                              "gpu", "baselines.instances_per_task", "PEFT LoRA forward")],
                          backward_only=gather_grad)
    fwd = forward_flops(mf, b, prompt_mean, tr.target_mean) if not causal else \
        forward_flops(mf, b, 0, prompt_mean + tr.target_mean)
    return phases, world * bc.steps * cfg.baselines.grad_accum * train_flops(fwd, ckpt)


def baselines_plan(ctx: Ctx) -> StagePlan:
    from .stages_hypernet import zero_stage

    cfg, mf = ctx.cfg, ctx.mf
    stage = zero_stage(cfg)
    world = ctx.world if stage > 0 else 1
    modes = [m for m in cfg.eval.methods if m in BASELINES]
    phases, flops = [Phase("load", host_base(ctx, mf.elem, deepspeed=stage > 0))], 0.0
    for m in modes:
        ph, f = _baseline_phases(ctx, m, stage, world)
        phases += ph
        flops += f
    disk = [Part(f"{len(modes)} LoRA adapter(s) + train.json", len(modes) * (
        S.teacher_adapter_bytes(mf.teacher_lora_params) + 40 * cfg.baselines.steps + 8192), "disk"),
            Part("resumable checkpoints (LoRA + Adam, kept while training)", len(modes) * (
                max(1, cfg.baselines.keep_checkpoints) + 1) * S.hypernet_checkpoint_disk_bytes(
                mf.teacher_lora_params, mf.elem, stage > 0), "disk", "baselines.keep_checkpoints",
                "train/engine.py Engine.save")]
    layout = (f"ZeRO-{stage} over {world} ranks (the hypernetwork's engine), modes one after the other" if stage
              else "one process (plain torch loop)")
    return StagePlan("baselines", bool(modes), layout, world, phases, disk,
                     first_step_forwards=cfg.baselines.grad_accum if modes else None, flops=flops,
                     steps=cfg.baselines.steps)


# ------------------------------------------------------------------------------------------------ evaluate
def eval_rows(ctx: Ctx) -> int:
    """Rows of one generation batch: eval.batch_size, at most a unit's rows (every method answers unit by unit of
    eval.tasks_per_batch tasks, each with at most data.max_eval_instances_per_task instances)."""
    e = ctx.cfg.eval
    return max(1, min(e.batch_size, e.tasks_per_batch * ctx.cfg.data.max_eval_instances_per_task))


def _gen_parts(ctx: Ctx, src: int, elem: int, prefix: int = 0) -> list[Part]:
    cfg, mf, sh = ctx.cfg, ctx.mf, ctx.mf.shape
    b, new = eval_rows(ctx), cfg.eval.max_new_tokens
    src = S.bucketed(src)  # decoding pads a batch to a 64-token bucket of its widest row (run/decode.py)
    fwd = forward_transient_bytes(sh, b, src, src + prefix, ctx.attn, elem, ctx.cuda)
    return [Part("prompt forward (one layer)", fwd, "gpu", "eval.batch_size", "activations.forward_transient_bytes"),
            Part("generation KV cache", S.generation_cache_bytes(sh, mf.arch, b, src, new, elem, prefix), "gpu",
                 "eval.batch_size", "structures.generation_cache_bytes")]


def _hypernet_phase(ctx: Ctx, method: str) -> Phase:
    """`eval/methods.Hypernet`: the student wraps the run's backbone (no second copy); per unit of
    eval.tasks_per_batch tasks the instruction states and generated adapters are computed once and held for the unit
    only; T5: the units' instruction K/V per decoding call; LLaMA: the prefix expanded per row in the generation
    cache."""
    cfg, mf, df, sh = ctx.cfg, ctx.mf, ctx.df, ctx.mf.shape
    elem, e = mf.elem, cfg.eval
    fusion = cfg.hypernet.fusion and method != "tagi_no_fusion"
    split = max((s for k, s in df.splits.items() if k != "train"), key=lambda s: s.instr_width)
    u = max(1, min(e.tasks_per_batch, split.tasks))
    w = S.bucketed(split.instr_width)  # encoded in 64-token buckets (Hypernet.unit)
    r = cfg.generated_rank
    parts = [Part("hypernetwork", mf.hypernet_params * elem, "gpu"),
             Part(f"instruction states of a unit of {u} tasks", S.instruction_states_bytes(
                 sh, u, w, elem, fusion or mf.arch == "llama", mf.arch), "gpu", "eval.tasks_per_batch",
                 "methods.Hypernet.unit encode_instruction_rows"),
             Part(f"generated adapters of {u} tasks", S.generated_adapters_bytes(u, mf.lora_params, elem, False)
                  + u * mf.target_modules * cfg.hypernet.hidden * elem, "gpu", "eval.tasks_per_batch",
                  "methods.Hypernet.unit generate_adapters"),
             Part("one layer of the instruction pass", S.instruction_pass_working_bytes(
                 sh, min(u, 16), w, elem, ctx.attn, ctx.cuda), "gpu", "eval.tasks_per_batch",
                 "structures.instruction_pass_working_bytes")]
    if mf.arch == "llama" and fusion:
        parts += _gen_parts(ctx, split.input_width, elem, prefix=w)
    else:  # T5: the encoder runs over the input alone; the instruction's cross-attention K/V are held per task
        if fusion:
            parts.append(Part(f"instruction K/V of {u} tasks (per decoding call)", S.t5_instruction_kv_bytes(
                sh, u, w, elem, r, False), "gpu", "eval.tasks_per_batch", "structures.t5_instruction_kv_bytes"))
        parts += _gen_parts(ctx, split.input_width, elem)
    return Phase(f"{method} (units of {u} tasks)", parts)


def evaluate_plan(ctx: Ctx) -> StagePlan:
    """`eval/evaluate.py`: sharded across the job's ranks (each its contiguous share of every (method, split)'s
    units), one backbone per process, methods one after the other."""
    cfg, mf, df = ctx.cfg, ctx.mf, ctx.df
    elem, e = mf.elem, cfg.eval
    methods = list(e.methods)
    world = ctx.world
    cuda_ctx = [Part("CUDA context", S.CUDA_CONTEXT_GPU_BYTES, "gpu")] if ctx.cuda else []
    resident = cuda_ctx + [Part("backbone weights (all methods)", S.backbone_weights_bytes(mf.params, elem),
                                "gpu", "backbone.dtype", "evaluate.run load_run_backbone")] + host_base(ctx)
    evals = {k: s for k, s in df.splits.items() if k != "train" and s.instances}
    widest = max(evals.values(), key=lambda s: s.prompt_width, default=df.splits["train"])
    phases = [Phase("load", host_base(ctx, elem))]
    flops, dsteps, rows_total = 0.0, 0, sum(s.instances for s in evals.values())
    new, b = e.max_new_tokens, eval_rows(ctx)
    target_weights = sum(t["count"] * t["d_in"] * t["d_out"] for t in mf.targets) * elem
    for m in methods:
        parts = list(resident)
        if m == "no_ft":
            parts += _gen_parts(ctx, widest.prompt_width, elem)
        elif m in BASELINES:
            parts += [Part(f"{m}: the target weights' host copies (LoRA merged in place, restored exactly)",
                           target_weights, "host", "", "methods.merged_lora"),
                      Part("the LoRA read on the host", S.teacher_adapter_bytes(mf.teacher_lora_params), "host")]
            src = widest.prompt_width if m == "tk_instruct" else widest.input_width
            parts += _gen_parts(ctx, src, elem)
        elif m == "teacher":
            g = S.evaluate_teacher_group(df.teacher_units, e.tasks_per_batch, e.teacher_group_bytes,
                                         mf.teacher_lora_params)
            one = S.evaluate_teacher_group_bytes(g, mf.teacher_lora_params)
            parts += [Part(f"a group of {g} teachers, stacked (fp32)", one, "gpu",
                           "eval.teacher_group_bytes / eval.tasks_per_batch",
                           "structures.evaluate_teacher_group_bytes"),
                      Part("their host list + stack while loading", 2 * one, "host", "eval.teacher_group_bytes",
                           "methods.Teachers.unit", cpu_alias=True)]
            parts += _gen_parts(ctx, widest.prompt_width, elem)
        elif m in HYPERNET_METHODS:
            parts += _hypernet_phase(ctx, m).parts
        phases.append(Phase(m, parts))
        for s in evals.values():
            src = s.prompt_mean if m in ("no_ft", "teacher", "tk_instruct") else s.input_mean
            flops += decode_flops(mf, s.instances, src, new, prefix=s.instr_mean if m in HYPERNET_METHODS else 0)
            dsteps += math.ceil(s.instances / b / world) * new * world
    pred_bytes = sum(s.instances * (s.chars_per_instance + 4 * new + 120) for s in evals.values())
    disk = [Part(f"predictions of {len(methods)} methods ({rows_total:,} instances each; shard files + merged)",
                 int(2 * len(methods) * pred_bytes), "disk", "data.max_eval_instances_per_task"),
            Part("metrics.json + report", 1 << 20, "disk")]
    return StagePlan("evaluate", True, f"sharded over {world} ranks (torchrun / srun / Slurm array), one GPU each, "
                     "methods one after the other", world, phases, disk, first_step_forwards=None, flops=flops,
                     decode_steps=dsteps, decode_weight_bytes=mf.params * elem, decode_layers=mf.shape.dec_layers)
