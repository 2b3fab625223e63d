"""What a method costs per instance, for the report: the analytic inference FLOPs (eval/flops.py) of each method
relative to tk_instruct's, from the mean token lengths of the evaluated tasks; and the stages' loss curves read back
from their logs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


from ..data.collate import encode_prompt, encode_target, instruction_ids
from ..data.prompts import build_task_input
from ..data.tasks import Task
from ..run.methods import HYPERNET_METHODS
from ..run.paths import RunPaths
from ..run.prompts import prompt_settings


# ------------------------------------------------------------------------------------------------ cost
def cost_lengths(cfg: Any, splits: dict[str, list[Task]], tokenizer, arch: str) -> dict[str, float]:
    """Mean token lengths the FLOPs model needs, over the evaluated unseen tasks (all splits when none):
    instruction (per task), instance input and target (per instance), test instances per task."""
    settings = prompt_settings(cfg, arch)
    keys = [s for s in splits if s.startswith("unseen")] or list(splits)
    tasks = [t for k in keys for t in splits[k]]
    instr = [len(instruction_ids(t, tokenizer, settings)) for t in tasks]
    inputs = [len(encode_prompt(tokenizer, build_task_input(i), settings.max_input_length))
              for t in tasks for i in t.instances]
    outs = [len(encode_target(tokenizer, i.label, settings.max_target_length)) for t in tasks for i in t.instances]
    return {"instr_len": sum(instr) / len(instr), "input_len": sum(inputs) / len(inputs),
            "out_len": sum(outs) / len(outs), "n_instances": len(inputs) / len(tasks), "tasks": len(tasks)}


def hypernet_flops(cfg: Any, bb) -> float:
    """FLOPs of one hypernetwork call for one task, from the run's shapes (eval/flops.hypernet_flops: analytic, equal
    to torch's flop counter on the real HyperNetwork, tests/eval/test_flops.py)."""
    from .flops import hypernet_flops as analytic

    h = cfg.hypernet
    d = bb.config.d_model if bb.arch == "t5" else bb.config.hidden_size
    return float(analytic(bb.specs, d, cfg.generated_rank, h.hidden, h.trunk_layers, h.embed_dim))


def relative_costs(cfg: Any, methods: Sequence[str], lengths: dict[str, float], bb) -> dict[str, float]:
    """Per-instance inference FLOPs of each method over tk_instruct's (batched multi-task LoRA: unmerged)."""
    from .flops import per_instance_flops

    kw = dict(arch=bb.arch, cfg_dict=bb.config.to_dict(), instr_len=round(lengths["instr_len"]),
              input_len=round(lengths["input_len"]), out_len=max(1, round(lengths["out_len"])),
              n_instances=max(1, round(lengths["n_instances"])))
    base = per_instance_flops("tk_instruct", **kw)
    hyper = hypernet_flops(cfg, bb)
    targets = sorted({s.name.rsplit(".", 1)[-1] for s in bb.specs})
    out = {}
    for m in methods:
        extra = {}
        if m in HYPERNET_METHODS:
            extra = dict(hypernet_flops=hyper, lora_rank=cfg.generated_rank, lora_targets=targets,
                         lora_mode="unmerged")
        out[m] = per_instance_flops(m, **kw, **extra) / base
    return out


# ------------------------------------------------------------------------------------------------ curves
def _jsonl_curve(path: Path, key: str) -> list[tuple[float, float]]:
    pts = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if key in obj and obj[key] is not None:
                pts.append((float(obj["step"]), float(obj[key])))
    return pts


def training_curves(paths: RunPaths, methods: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Loss curves of the stages, read back from their logs: pretrain / finetune / baselines metrics.jsonl,
    the teachers' metrics.json (mean over teachers)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    curves["pretrain CE"] = _jsonl_curve(paths.pretrain / "metrics.jsonl", "ce")
    for m in methods:
        if m in HYPERNET_METHODS:
            log = paths.finetune(m) / "metrics.jsonl"
            curves[f"finetune {m} loss"] = _jsonl_curve(log, "loss")
            if m == "tagi":
                for term in ("ce", "kl", "l_ins"):
                    curves[f"finetune tagi {term}"] = _jsonl_curve(log, term)
    for mode in ("tk_instruct", "no_instruction"):  # the baselines log like the hypernetwork stages (engine_stage)
        curves[f"baseline {mode} loss"] = _jsonl_curve(paths.baseline(mode) / "metrics.jsonl", "loss")
    teach = []
    for mfile in sorted(paths.teachers.glob("*/metrics.json")):
        every10 = json.loads(mfile.read_text()).get("losses_every10") or []
        if every10:
            teach.append(every10)
    if teach:
        n = min(map(len, teach))
        curves["teachers mean loss"] = [(10.0 * i, sum(c[i] for c in teach) / len(teach)) for i in range(n)]
    return {k: v for k, v in curves.items() if v}
