"""The whole plan of a run: every stage the config runs, what does not fit and the knob that helps, disk and time.

    make_plan(cfg, nodes=2, gpus_per_node=8) -> dict   (what `tagi-ds plan --json` prints)
    format_plan(plan) -> str                           (the table `tagi-ds plan` prints)

Limits: `gpu_mem_gib` per GPU (default 80) and `host_mem_gib` per node (default 1 TiB); every process (a rank or a
Slurm array element) gets host/G. Time: FLOPs / (`throughput_tflops` x the GPUs the stage uses) plus, for greedy
decoding, one read of the weights per step at `mem_bandwidth_gbs` (decoding is memory-bound); data loading,
checkpoint writes and the Slurm queue are not counted.
"""
from __future__ import annotations

from typing import Any, Optional

from ..errors import ConfigError
from .data_summary import data_facts
from .shapes import GiB, model_facts
from .stage_types import Ctx, StagePlan
from .stages_hypernet import hypernet_stage_plan, prefetch_elems, zero_stage
from .stages_single import BASELINES, HYPERNET_METHODS, baselines_plan, cache_plan, evaluate_plan, teacher_plan

STAGES = ("teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate")
DEFAULT_GPU_MEM_GIB = 80.0
DEFAULT_HOST_MEM_GIB = 1024.0  # per node
DEFAULT_THROUGHPUT_TFLOPS = 100.0  # sustained bf16 TFLOP/s per GPU: ~1/3 of an A100's 312 peak
DEFAULT_MEM_BANDWIDTH_GBS = 1500.0  # GB/s per GPU reading weights while decoding (A100 80GB: 2039 peak)
# Eager greedy decoding is launch-bound, not bandwidth-bound: one step costs about this much per decoder layer
# whatever the batch. Measured with bench/eval_throughput.py on an H200 (2026-11-30, transformers 5.24, torch 2.11,
# bf16, eval.batch_size 16 and 64): 1.06-1.38 ms per layer at 1.1B (22 layers), 1.10-1.54 at 7B (32 layers), where
# weights / bandwidth gave 0.5 and 3.2 ms per step. A step takes the larger of the two.
DECODE_LAYER_STEP_S = 1.2e-3


def stages_run(cfg: Any) -> list[str]:
    """The stages the pipeline runs for this config (pipeline.plan's rules)."""
    variants = [m for m in cfg.eval.methods if m in HYPERNET_METHODS]
    out = []
    if "teacher" in cfg.eval.methods or variants:
        out += ["teacher", "cache-logits"]
    if cfg.pretrain.enabled:
        out.append("pretrain")
    if cfg.finetune.enabled and variants:
        out.append("finetune")
    if any(m in BASELINES for m in cfg.eval.methods):
        out.append("baselines")
    return out + ["evaluate"]


def _stage_plan(ctx: Ctx, stage: str) -> StagePlan:
    if stage == "teacher":
        return teacher_plan(ctx)
    if stage == "cache-logits":
        return cache_plan(ctx)
    if stage in ("pretrain", "finetune"):
        return hypernet_stage_plan(ctx, stage)
    if stage == "baselines":
        return baselines_plan(ctx)
    return evaluate_plan(ctx)


def zero_recommendation(ctx: Ctx, stage: str, gpu_limit: float) -> dict:
    """ZeRO stage by fit: ZeRO-2 (the frozen backbone whole on every GPU, only the hypernetwork's gradients and
    optimizer states sharded, no per-step parameter gathers) when its peak fits the GPU; else ZeRO-3 (the
    backbone sharded, gathered layer by layer every micro batch). The knob: distributed.ds_config (the shipped
    ds_configs/zero2.json / zero3.json) or distributed.zero_stage."""
    peaks = {z: hypernet_stage_plan(ctx, stage, zero=z) for z in (2, 3)}
    gpu = {z: sp.peak("gpu")[0] for z, sp in peaks.items()}
    rec = 2 if gpu[2] <= gpu_limit else 3
    current = zero_stage(ctx.cfg)
    return {"config_stage": current, "recommended_stage": rec,
            "gpu_gib_zero2": _gib(gpu[2]), "gpu_gib_zero3": _gib(gpu[3]),
            "gather_gib_per_step_zero2": _gib(peaks[2].gather_bytes_per_step),
            "gather_gib_per_step_zero3": _gib(peaks[3].gather_bytes_per_step),
            "knob": f"distributed.ds_config=ds_configs/zero{rec}.json (or distributed.zero_stage={rec})",
            "ok": current == rec or (current < 3 and rec == 2)}


def _gib(n: float) -> float:
    return round(n / GiB, 3)


def _knobs(sp: StagePlan, where: str, limit: float) -> list[str]:
    """The knobs of the largest parts of the peak phase at `where`, biggest first, until the rest would fit."""
    _, phase_name = sp.peak(where)
    phase = next(ph for ph in sp.phases if ph.name == phase_name)
    parts = sorted((p for p in phase.parts if p.where == where), key=lambda p: -p.bytes)
    total, out = phase.total(where), []
    for p in parts:
        if total <= limit:
            break
        if p.knob:
            out.append(f"{p.knob} ({p.name}: {p.bytes / GiB:.1f} GiB)")
        total -= p.bytes
    return out or [f"none in the config ({parts[0].name}: {parts[0].bytes / GiB:.1f} GiB)"] if parts else []


def _time_hours(sp: StagePlan, throughput_tflops: float, bandwidth_gbs: float) -> float:
    gpus = max(1, sp.processes)
    compute = sp.flops / (throughput_tflops * 1e12 * gpus)
    per_step = max(sp.decode_weight_bytes / (bandwidth_gbs * 1e9), sp.decode_layers * DECODE_LAYER_STEP_S)
    decode = sp.decode_steps * per_step / gpus
    return (compute + decode) / 3600.0


def stage_record(sp: StagePlan, gpu_limit: float, host_limit: float, throughput: float, bandwidth: float) -> dict:
    hours = _time_hours(sp, throughput, bandwidth)
    gpu, gpu_phase = sp.peak("gpu")
    host, host_phase = sp.peak("host")
    fits_gpu, fits_host = gpu <= gpu_limit, host <= host_limit
    return {
        "runs": sp.runs, "layout": sp.layout, "processes": sp.processes,
        "gpu_gib": _gib(gpu), "gpu_peak_phase": gpu_phase,
        "host_gib_per_rank": _gib(host), "host_peak_phase": host_phase,
        "cpu_device_gib": _gib(sp.cpu_device_peak),  # GPU + host parts together: a CPU-only run's peak RSS
        "disk_gib": _gib(sp.disk_bytes),
        "first_step_forwards": sp.first_step_forwards,
        "zero3_gather_gib_per_step": _gib(sp.gather_bytes_per_step),  # ZeRO traffic received per step, any stage
        "fits": fits_gpu and fits_host, "fits_gpu": fits_gpu, "fits_host": fits_host,
        "knobs": ([] if fits_gpu else [f"GPU: {k}" for k in _knobs(sp, "gpu", gpu_limit)])
        + ([] if fits_host else [f"host: {k}" for k in _knobs(sp, "host", host_limit)]),
        "tflop": round(sp.flops / 1e12, 1), "time_h": round(hours, 3),
        "time_s": round(3600 * hours, 2),  # short stages (benches) need seconds
        "steps": sp.steps, "notes": sp.notes,
        "phases": {ph.name: [p.to_dict() for p in ph.parts] for ph in sp.phases},
        "disk": [p.to_dict() for p in sp.disk],
    }


def make_plan(cfg: Any, nodes: int = 1, gpus_per_node: int = 8, stage: str = "all",
              gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB, host_mem_gib: float = DEFAULT_HOST_MEM_GIB,
              throughput_tflops: float = DEFAULT_THROUGHPUT_TFLOPS,
              mem_bandwidth_gbs: float = DEFAULT_MEM_BANDWIDTH_GBS) -> dict[str, Any]:
    """Everything `tagi-ds plan` prints, as a dict (see the module docstring)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if stage != "all" and stage not in STAGES:
        raise ConfigError(f"--stage must be all or one of {', '.join(STAGES)}, got {stage!r}")
    if min(gpu_mem_gib, host_mem_gib, throughput_tflops, mem_bandwidth_gbs) <= 0:
        raise ConfigError("--gpu-mem, --host-mem, --throughput and --mem-bandwidth must be > 0")
    mf = model_facts(cfg)
    df = data_facts(cfg, mf.local_dir, mf.arch)
    ctx = Ctx(cfg, mf, df, nodes, gpus_per_node, prefetch_elems(cfg.distributed.ds_config))
    gpu_limit, host_limit = gpu_mem_gib * GiB, host_mem_gib * GiB / gpus_per_node
    runs = stages_run(cfg)
    wanted = list(STAGES) if stage == "all" else [stage]
    stages = {}
    for s in wanted:
        if s not in runs and stage == "all":
            continue
        rec = stage_record(_stage_plan(ctx, s), gpu_limit, host_limit, throughput_tflops, mem_bandwidth_gbs)
        rec["runs"] = s in runs
        if s in ("pretrain", "finetune") and cfg.distributed.use_deepspeed:
            rec["zero"] = zero_recommendation(ctx, s, gpu_limit)
        stages[s] = rec
    tr = df.splits["train"]
    return {
        "config": cfg.name, "backbone": mf.name, "arch": mf.arch, "dtype": mf.compute_dtype,
        "checkpoint_dtype": mf.checkpoint_dtype, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "world_size": nodes * gpus_per_node,
        "limits": {"gpu_gib": gpu_mem_gib, "host_gib_per_node": host_mem_gib,
                   "host_gib_per_rank": round(host_mem_gib / gpus_per_node, 3),
                   "throughput_tflops_per_gpu": throughput_tflops, "mem_bandwidth_gbs_per_gpu": mem_bandwidth_gbs},
        "model": {"backbone_params": mf.params, "backbone_largest_layer_params": mf.largest_layer,
                  "targets": mf.targets, "target_modules": mf.target_modules,
                  "lora_params_per_task": mf.lora_params, "teacher_lora_params": mf.teacher_lora_params,
                  "hypernet_params": mf.hypernet_params, "hypernet_largest_layer_params": mf.hypernet_largest},
        "data": {"how": df.how, "assumptions": df.assumptions, "train_tasks": tr.tasks,
                 "train_instances": tr.instances, "teacher_units": df.teacher_units,
                 "instruction_width": tr.instr_width, "splits": {k: vars(v) for k, v in df.splits.items()},
                 "pretrain": vars(df.pretrain)},
        "stages": stages,
        "run": {"disk_gib": round(sum(s["disk_gib"] for s in stages.values() if s["runs"]), 3),
                "time_h": round(sum(s["time_h"] for s in stages.values() if s["runs"]), 3),
                "not_fitting": [k for k, s in stages.items() if s["runs"] and not s["fits"]]},
    }


# ------------------------------------------------------------------------------------------------ text
def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_plan(p: dict[str, Any], detail: Optional[bool] = None) -> str:
    lim, m, d = p["limits"], p["model"], p["data"]
    lines = [
        f"plan: {p['config']} on {p['nodes']} node(s) x {p['gpus_per_node']} GPU(s) = {p['world_size']} ranks",
        f"backbone  {p['backbone']} ({p['arch']}, {_count(m['backbone_params'])} params, {p['dtype']}; checkpoint "
        f"{p['checkpoint_dtype']}); LoRA on {m['target_modules']} linears: {_count(m['lora_params_per_task'])} "
        f"per generated adapter, {_count(m['teacher_lora_params'])} per teacher; hypernet "
        f"{_count(m['hypernet_params'])} trainable",
        f"data      {d['train_tasks']:,} train tasks / {d['train_instances']:,} instances, {d['teacher_units']:,} "
        f"teacher units, instructions padded to {d['instruction_width']} tokens; {d['how']}",
    ]
    lines += [f"  assumed: {a}" for a in d["assumptions"]]
    lines += [
        f"limits    GPU {lim['gpu_gib']:g} GiB; host {lim['host_gib_per_node']:g} GiB per node = "
        f"{lim['host_gib_per_rank']:g} GiB per rank; {lim['throughput_tflops_per_gpu']:g} TFLOP/s and "
        f"{lim['mem_bandwidth_gbs_per_gpu']:g} GB/s per GPU",
        "",
        f"{'stage':<13}{'GPU GiB':>9}{'host GiB':>10}{'disk GiB':>10}{'fwd→step1':>10}{'ZeRO GiB/step':>16}"
        f"{'time h':>9}  {'fits':<5} layout",
    ]
    for name, s in p["stages"].items():
        fwd = "-" if s["first_step_forwards"] is None else str(s["first_step_forwards"])
        gather = f"{s['zero3_gather_gib_per_step']:.1f}" if s["zero3_gather_gib_per_step"] else "-"
        fits = "yes" if s["fits"] else "NO:" + ("G" if not s["fits_gpu"] else "") + ("H" if not s["fits_host"] else "")
        mark = "" if s["runs"] else " (not run by this config)"
        lines.append(f"{name:<13}{s['gpu_gib']:>9.1f}{s['host_gib_per_rank']:>10.1f}{s['disk_gib']:>10.1f}{fwd:>10}"
                     f"{gather:>16}{s['time_h']:>9.2f}  {fits:<5} {s['layout']}{mark}")
    r = p["run"]
    lines += ["", f"run total: disk {r['disk_gib']:.1f} GiB written; {r['time_h']:.1f} h of stage time in sequence "
                  f"(queueing, data loading and checkpoint writes not counted)"]
    bad = [(k, s) for k, s in p["stages"].items() if not s["fits"]]
    if bad:
        lines.append("")
        lines.append("does NOT fit (G = GPU, H = host per rank); the knobs that help, largest part first:")
        for k, s in bad:
            if not s["fits_gpu"]:
                lines.append(f"  {k}: GPU {s['gpu_gib']:.1f} > {lim['gpu_gib']:g} GiB at '{s['gpu_peak_phase']}'")
                lines += [f"      {kn[5:]}" for kn in s["knobs"] if kn.startswith("GPU: ")]
            if not s["fits_host"]:
                lines.append(f"  {k}: host {s['host_gib_per_rank']:.1f} > {lim['host_gib_per_rank']:g} GiB per rank "
                             f"at '{s['host_peak_phase']}'")
                lines += [f"      {kn[6:]}" for kn in s["knobs"] if kn.startswith("host: ")]
    for k, s in p["stages"].items():
        z = s.get("zero")
        if z:
            verdict = "as configured" if z["ok"] else f"configured ZeRO-{z['config_stage']}: set {z['knob']}"
            lines.append(f"ZeRO by fit, {k}: ZeRO-2 {z['gpu_gib_zero2']:.1f} GiB/GPU "
                         f"({z['gather_gib_per_step_zero2']:.2f} GiB/step moved), ZeRO-3 {z['gpu_gib_zero3']:.1f} "
                         f"GiB/GPU ({z['gather_gib_per_step_zero3']:.1f} GiB/step gathered) -> "
                         f"ZeRO-{z['recommended_stage']} ({verdict})")
    show = detail if detail is not None else len(p["stages"]) == 1
    if show:
        for k, s in p["stages"].items():
            lines += ["", f"{k}: {s['layout']}"]
            for ph, parts in s["phases"].items():
                lines.append(f"  phase '{ph}'")
                for where in ("gpu", "host"):
                    for q in sorted((q for q in parts if q["where"] == where), key=lambda q: -q["bytes"]):
                        knob = f"   [{q['knob']}]" if q["knob"] else ""
                        lines.append(f"    {where:<5}{q['bytes'] / GiB:10.3f} GiB  {q['name']}{knob}")
            for q in s["disk"]:
                lines.append(f"  disk {q['bytes'] / GiB:10.3f} GiB  {q['name']}")
            lines += [f"  note: {n}" for n in s["notes"]]
    lines.append("CUDA context / allocator fragmentation / NCCL buffers are approximate; see tagi_ds/plan/*.py")
    return "\n".join(lines)
