"""Stage `tagi-ds evaluate --config X`: every method of cfg.eval.methods in ONE harness, then the report.

Same tasks, backbone, tokenizer, prompt layout and greedy decoding (eval.max_new_tokens) for every method
(methods.py says how each one runs). Splits: the run's evaluation splits (synthetic: seen, unseen_paraphrase,
unseen_composition, plus "unseen" = the two pooled; SNI / P3: seen, unseen).

Outputs under <run_dir>:
  eval/predictions/<method>/<split>.jsonl   {"task", "id", "input", "prediction", "references"} per instance
  eval/metrics.json                         per method and split: overall, per task, per category; the echo
                                            reference; FLOPs inputs; timings
  eval/stage.json                           the identity of the configuration the report belongs to: an evaluation
                                            of another configuration is refused before anything is written
  report.json, report.md, *.png             report.write_report (schema: report.py)
Cost columns: analytic per-instance inference FLOPs relative to tk_instruct (eval/flops.py; once-per-task work
amortised over the run's test instances per task) and measured seconds per instance relative to tk_instruct
(every method timed in this same process, one after the other).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..data.collate import encode_prompt, encode_target, instruction_ids
from ..data.prompts import build_task_input
from ..data.tasks import Task
from ..errors import DataError
from ..io_utils import atomic_write_json, atomic_write_text
from ..metrics import category_key, compute_grouped_metrics, compute_metrics
from ..run.backbone import load_run_backbone
from ..run.identity import check_stage_record, config_identity, write_stage_record
from ..run.methods import HYPERNET_METHODS, check_methods
from ..run.paths import RunPaths
from ..run.prompts import prompt_settings
from ..run.stage_lock import stage_locked
from .methods import MethodPredictions, predict_method

STAGE = "evaluate"
POOLED = "unseen"


def identity(cfg, sub: Optional[str] = None) -> dict:
    """The report depends on every setting but the runtime ones: all stages' sections and the evaluation's."""
    return config_identity(cfg, ("seed", "data", "backbone", "lora", "hypernet", "teacher", "cache", "pretrain",
                                 "finetune", "baselines", "eval"))


# ------------------------------------------------------------------------------------------------ data
def eval_splits(cfg: Any) -> dict[str, list[Task]]:
    """The run's evaluation splits (every key of the registry but "train"), in registry order."""
    from ..data.registry import load_run_tasks_from_config

    splits = load_run_tasks_from_config(cfg)
    return {k: v for k, v in splits.items() if k != "train" and v}


def pooled_splits(splits: dict[str, Any]) -> dict[str, list[str]]:
    """Report splits that pool several evaluated ones: "unseen" = unseen_paraphrase + unseen_composition."""
    parts = [s for s in ("unseen_paraphrase", "unseen_composition") if s in splits]
    return {POOLED: parts} if POOLED not in splits and len(parts) > 1 else {}


def _references(tasks: Sequence[Task]) -> list[list[str]]:
    return [list(i.references) for t in tasks for i in t.instances]


def _task_of_rows(tasks: Sequence[Task]) -> list[str]:
    return [t.name for t in tasks for _ in t.instances]


def _category_of_rows(tasks: Sequence[Task]) -> list[str]:
    return [category_key(t.categories[0]) if t.categories else "uncategorized" for t in tasks for _ in t.instances]


def score_split(tasks: Sequence[Task], preds: Sequence[str]) -> dict[str, Any]:
    """{"overall", "per_task", "per_category"} of one method on one split."""
    refs = _references(tasks)
    if len(preds) != len(refs):
        raise DataError(f"evaluate: {len(preds)} predictions for {len(refs)} instances")
    return {"overall": compute_metrics(preds, refs), "instances": len(refs),
            "per_task": compute_grouped_metrics(preds, refs, _task_of_rows(tasks)),
            "per_category": compute_grouped_metrics(preds, refs, _category_of_rows(tasks))}


def echo_scores(splits: dict[str, list[Task]]) -> dict[str, dict[str, float]]:
    """The copy-the-input reference of every split (and of the pooled ones)."""
    out = {s: compute_metrics([i.input for t in ts for i in t.instances], _references(ts)) for s, ts in splits.items()}
    for name, parts in pooled_splits(splits).items():
        ts = [t for p in parts for t in splits[p]]
        out[name] = compute_metrics([i.input for t in ts for i in t.instances], _references(ts))
    return out


def demo_output_scores(splits: dict[str, list[Task]]) -> dict[str, Optional[dict[str, float]]]:
    """The 'copy the first demonstration's output' floor of every split (None where a task has no example)."""
    out: dict[str, Optional[dict[str, float]]] = {}
    groups = {**{s: [s] for s in splits}, **pooled_splits(splits)}
    for name, parts in groups.items():
        ts = [t for p in parts for t in splits[p]]
        if any(not t.positive_examples for t in ts):
            out[name] = None
            continue
        preds = [t.positive_examples[0].output for t in ts for _ in t.instances]
        out[name] = compute_metrics(preds, _references(ts))
    return out


def write_predictions(path: Path, tasks: Sequence[Task], preds: Sequence[str]) -> None:
    rows = [json.dumps({"task": t.name, "id": i.id, "input": i.input, "prediction": p,
                        "references": list(i.references)}, ensure_ascii=False)
            for (t, i), p in zip(((t, i) for t in tasks for i in t.instances), preds)]
    atomic_write_text(path, "\n".join(rows) + ("\n" if rows else ""))


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    """(predictions, references) of a predictions .jsonl (tests and re-scoring)."""
    preds, refs = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            preds.append(obj["prediction"])
            refs.append(obj["references"])
    return preds, refs


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
    """FLOPs of one hypernetwork call for one task (counted by torch's flop counter on a fresh hypernetwork of the
    run's shape: the count depends on the shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..modeling.hypernet import HyperNetwork

    h, lora = cfg.hypernet, cfg.lora
    d = bb.config.d_model if bb.arch == "t5" else bb.config.hidden_size
    net = HyperNetwork(bb.specs, d, h.r or lora.r, hidden=h.hidden, trunk_layers=h.trunk_layers,
                       embed_dim=h.embed_dim, backend="reference")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, d))
    return float(fc.get_total_flops())


def relative_costs(cfg: Any, methods: Sequence[str], lengths: dict[str, float], bb) -> dict[str, float]:
    """Per-instance inference FLOPs of each method over tk_instruct's (batched multi-task LoRA: unmerged)."""
    from .flops import per_instance_flops

    h = cfg.hypernet
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
            extra = dict(hypernet_flops=hyper, lora_rank=h.r or cfg.lora.r, lora_targets=targets,
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
    """Loss curves of the stages, read back from their logs: pretrain / finetune metrics.jsonl, the baselines'
    train.json, the teachers' metrics.json (mean over teachers)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    curves["pretrain CE"] = _jsonl_curve(paths.pretrain / "metrics.jsonl", "ce")
    for m in methods:
        if m in HYPERNET_METHODS:
            log = paths.finetune(m) / "metrics.jsonl"
            curves[f"finetune {m} loss"] = _jsonl_curve(log, "loss")
            if m == "tagi":
                for term in ("ce", "kl", "l_ins"):
                    curves[f"finetune tagi {term}"] = _jsonl_curve(log, term)
    for mode in ("tk_instruct", "no_instruction"):
        p = paths.baseline(mode) / "train.json"
        if p.is_file():
            losses = json.loads(p.read_text()).get("losses", [])
            curves[f"baseline {mode} loss"] = [(float(i), sum(losses[i:i + 10]) / len(losses[i:i + 10]))
                                               for i in range(0, len(losses), 10)]
    teach = []
    for mfile in sorted(paths.teachers.glob("*/metrics.json")):
        every10 = json.loads(mfile.read_text()).get("losses_every10") or []
        if every10:
            teach.append(every10)
    if teach:
        n = min(map(len, teach))
        curves["teachers mean loss"] = [(10.0 * i, sum(c[i] for c in teach) / len(teach)) for i in range(n)]
    return {k: v for k, v in curves.items() if v}


# ------------------------------------------------------------------------------------------------ the stage
@stage_locked("evaluate")  # one writer per stage folder (run/stage_lock.py)
def run(cfg: Any, sub: Optional[str] = None, *, progress: bool = True, log: Callable[[str], None] = print,
        methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Evaluate `methods` (default cfg.eval.methods), write predictions, metrics and the report; returns the
    report.json object."""
    from .report import write_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    methods = check_methods(methods if methods is not None else cfg.eval.methods)
    paths = RunPaths.of(cfg)
    run_dir = paths.run_dir
    # Before anything is written: a report of another configuration is never overwritten (pipeline --from evaluate
    # or another run name redoes it).
    record = check_stage_record(paths.eval, STAGE, identity(cfg))
    splits = eval_splits(cfg)
    pooled = pooled_splits(splits)
    bb = load_run_backbone(cfg)
    bb.gradient_checkpointing = False  # inference only (and the student refuses HF's checkpointing)
    _ = bb.model  # load the weights now: no method's timing includes the lazy load
    t_all = time.perf_counter()
    details: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, float]] = {}
    for m in methods:
        t0 = time.perf_counter()
        mp: MethodPredictions = predict_method(cfg, m, splits, bb, log)
        details[m], results[m] = {}, {}
        for split, tasks in splits.items():
            preds = mp.by_split.get(split)
            if preds is None:
                results[m][split] = None
                continue
            write_predictions(paths.predictions(m, split), tasks, preds)
            details[m][split] = score_split(tasks, preds)
            results[m][split] = details[m][split]["overall"]
        for name, parts in pooled.items():
            if all(mp.by_split.get(p) is not None for p in parts):
                tasks = [t for p in parts for t in splits[p]]
                preds = [x for p in parts for x in mp.by_split[p]]
                details[m][name] = score_split(tasks, preds)
                results[m][name] = details[m][name]["overall"]
            else:
                results[m][name] = None
        if mp.instances:
            timing[m] = {"seconds": round(mp.seconds, 3), "instances": mp.instances,
                         "seconds_per_instance": mp.seconds / mp.instances}
        shown = ", ".join(f"{s} {r['rougeL']:.1f}/{r['exact_match']:.1f}" for s, r in results[m].items() if r)
        log(f"evaluate {m}: {shown or 'no numbers'} (R-L/EM; {time.perf_counter() - t0:.0f} s)")
    lengths = cost_lengths(cfg, splits, bb.tokenizer, bb.arch)
    rel = relative_costs(cfg, methods, lengths, bb)
    tk_time = timing.get("tk_instruct", {}).get("seconds_per_instance")
    for m in methods:
        results[m]["relative_flops"] = rel[m]
        if m in timing:
            timing[m]["relative_time"] = (timing[m]["seconds_per_instance"] / tk_time) if tk_time else None
    echo = echo_scores(splits)
    demo = demo_output_scores(splits)
    floors = [{"floor": label, **{f"{sp} R-L / EM": (f"{v[sp]['rougeL']:.2f} / {v[sp]['exact_match']:.2f}"
                                                    if v.get(sp) else "—") for sp in echo}}
              for label, v in (("copy the input", echo), ("copy the first demonstration's output", demo))]
    cost_rows = [{"method": m, "rel. FLOPs": round(rel[m], 3),
                  "ms / instance": round(1000 * timing[m]["seconds_per_instance"], 3) if m in timing else "—",
                  "rel. time": (round(timing[m]["relative_time"], 3)
                                if m in timing and timing[m].get("relative_time") is not None else "—")}
                 for m in methods]
    tables = {"Cost per instance (FLOPs: analytic; time: measured in this run)": cost_rows,
              "Trivial floors": floors,
              "Unseen ROUGE-L per task": _per_task_rows(details, methods, [s for s in splits if s.startswith("unseen")])}
    atomic_write_json(paths.eval_metrics, {"methods": details, "echo": echo, "demo_output": demo,
                                                 "timing": timing,
                                                 "flops": {"lengths": lengths, "relative": rel},
                                                 "splits": {s: [t.name for t in ts] for s, ts in splits.items()},
                                                 "seconds": time.perf_counter() - t_all})
    curves = training_curves(paths, methods)
    title = f"TAGI evaluation report: run {cfg.name} ({cfg.data.source})"
    write_report(run_dir, results, curves=curves, extra_tables=tables, echo=echo,
                 timings={m: t["seconds_per_instance"] for m, t in timing.items()}, title=title)
    write_stage_record(paths.eval, record)
    log(f"evaluate: report in {paths.report} ({time.perf_counter() - t_all:.0f} s)")
    from .report import read_report

    return read_report(run_dir)


def _per_task_rows(details: dict, methods: Sequence[str], splits: Sequence[str]) -> list[dict]:
    rows = []
    for split in splits:
        names: list[str] = []
        for m in methods:
            names += [n for n in (details[m].get(split) or {}).get("per_task", {}) if n not in names]
        for n in names:
            row: dict[str, Any] = {"task": n, "split": split}
            for m in methods:
                pt = (details[m].get(split) or {}).get("per_task", {})
                row[m] = round(pt[n]["rougeL"], 1) if n in pt else "—"
            rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    run(args.cfg)
    return 0
