"""Every evaluated method as one function: (config, tasks of each split, the run's backbone) → one greedy prediction
per instance. Evaluation only READS finished stage folders; a method whose folder is missing has no numbers.

How each method runs at test time (run/methods.py names them; the same backbone, tokenizer, prompt encoder and greedy
decoder for all):
- no_ft: the frozen backbone reads the full Tk-Instruct prompt.
- no_instruction / tk_instruct: the multitask LoRA baselines (baselines/<mode>), LoRA merged for inference.
- teacher: each seen task's own LoRA teacher on the full prompt (all teachers batched through the LoRA hooks);
  it has no number on unseen tasks (no teacher exists for them).
- hint, tagi and the ablations: a hypernetwork export (finetune/<variant>/export). The instruction is encoded ONCE
  per task and the adapters of all the split's tasks are generated in one hypernetwork call; the instances of all
  tasks are then decoded together, each row with its task's LoRA (batched hooks) and instruction prefix (fusion).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..data.collate import encode_student_input, instruction_ids, pad_id
from ..data.prompts import build_task_input
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..modeling.lora import BatchedLoraHooks
from ..run.backbone import LoadedBackbone, load_model_folder
from ..run.decode import decode_prompts, decode_student
from ..run.export_io import EXPORT_CONFIG, load_student_from_export
from ..run.methods import ALL_METHODS, BASELINES, HYPERNET_METHODS
from ..run.paths import RunPaths
from ..run.peft_io import ADAPTER_CONFIG, read_peft_adapter
from ..run.prompts import prompt_ids, prompt_settings
from ..run.units import teacher_unit

Log = Callable[[str], None]


@dataclass
class MethodPredictions:
    """Predictions per split (None: the method has no number there) and the seconds spent producing them
    (tokenization + instruction encoding / adapter generation + decoding; model loading excluded)."""

    by_split: dict[str, Optional[list[str]]]
    seconds: float
    instances: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(splits: dict[str, list[Task]], device: torch.device,
           predict: Callable[[list[Task]], list[str]]) -> MethodPredictions:
    """`predict` on every split, timed (the seconds exclude whatever the caller loaded before)."""
    out, secs, n = {}, 0.0, 0
    for split, tasks in splits.items():
        t0 = time.perf_counter()
        out[split] = predict(tasks)
        _sync(device)
        secs += time.perf_counter() - t0
        n += sum(len(t.instances) for t in tasks)
    return MethodPredictions(out, secs, n)


def _none(splits: dict[str, list[Task]]) -> MethodPredictions:
    return MethodPredictions({s: None for s in splits}, 0.0, 0)


# ------------------------------------------------------------------------------------------------ full prompt
def predict_no_ft(cfg: Any, splits: dict[str, list[Task]], bb: LoadedBackbone, log: Log) -> MethodPredictions:
    settings = prompt_settings(cfg, bb.arch)
    return _timed(splits, bb.device, lambda tasks: decode_prompts(
        bb.model, bb.tokenizer, bb.arch, prompt_ids(tasks, bb.tokenizer, settings), device=bb.device,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size))


def predict_teacher(cfg: Any, splits: dict[str, list[Task]], bb: LoadedBackbone, log: Log) -> MethodPredictions:
    """Seen split only: every task's teacher (task or category unit), all units batched in the hooks."""
    paths = RunPaths.of(cfg)
    tasks = splits.get("seen") or []
    units = sorted({teacher_unit(t, cfg.teacher.group_by) for t in tasks})
    missing = [u for u in units if not (paths.teacher(u) / ADAPTER_CONFIG).is_file()]
    if not tasks or missing:
        if missing:
            log(f"evaluate: teacher: no published teacher for {len(missing)} unit(s) (e.g. {missing[0]}); "
                f"no teacher numbers")
        return _none(splits)
    loaded = [read_peft_adapter(paths.teacher(u), bb.specs, device=bb.device) for u in units]
    scales = {round(s, 8) for _, s, _ in loaded}
    if len(scales) != 1:
        raise ArtifactMismatchError(f"{paths.teachers}: teachers have different LoRA scales {sorted(scales)}")
    adapters = {mt: (torch.stack([a[mt][0] for a, _, _ in loaded]), torch.stack([a[mt][1] for a, _, _ in loaded]))
                for mt in loaded[0][0]}
    del loaded
    hooks = BatchedLoraHooks(bb.model, bb.specs, scales.pop())
    settings = prompt_settings(cfg, bb.arch)
    unit_pos = {u: i for i, u in enumerate(units)}
    try:
        mp = _timed({"seen": tasks}, bb.device, lambda ts: decode_prompts(
            bb.model, bb.tokenizer, bb.arch, prompt_ids(ts, bb.tokenizer, settings), device=bb.device,
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, hooks=hooks, adapters=adapters,
            row_unit=[unit_pos[teacher_unit(t, cfg.teacher.group_by)] for t in ts for _ in t.instances]))
    finally:
        hooks.remove()
    return MethodPredictions({**_none(splits).by_split, "seen": mp.by_split["seen"]}, mp.seconds, mp.instances)


# ------------------------------------------------------------------------------------------------ baselines
def predict_baseline(cfg: Any, mode: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                     log: Log) -> MethodPredictions:
    folder = RunPaths.of(cfg).baseline(mode)
    if not (folder / ADAPTER_CONFIG).is_file():
        log(f"evaluate: {mode}: no trained baseline at {folder} (run the `baselines` stage); no numbers")
        return _none(splits)
    model, _ = load_model_folder(folder, bb.device)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # no per-token LoRA cost
    settings = prompt_settings(cfg, bb.arch)
    with_instruction = mode == "tk_instruct"
    return _timed(splits, bb.device, lambda tasks: decode_prompts(
        model, bb.tokenizer, bb.arch, prompt_ids(tasks, bb.tokenizer, settings, with_instruction), device=bb.device,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size))


# ------------------------------------------------------------------------------------------------ hypernetwork
@torch.no_grad()
def student_predict(student, tokenizer, tasks: Sequence[Task], settings, *, device, max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """All instances of `tasks`: instructions encoded once per task, adapters generated once for all tasks, then
    batched greedy decoding across tasks (each row its task's LoRA and instruction prefix)."""
    rows = [instruction_ids(t, tokenizer, settings) for t in tasks]
    encoding = student.encode_instruction_rows(rows, pad_id(tokenizer), device).to(device)  # once per task
    adapters = student.generate_adapters(encoding)  # one hypernetwork call for every task of the split
    inputs = [encode_student_input(tokenizer, build_task_input(inst), settings.max_input_length, student.fusion)
              for t in tasks for inst in t.instances]  # LLaMA fusion: no second bos after the instruction prefix
    task_of_row = [ti for ti, t in enumerate(tasks) for _ in t.instances]
    return decode_student(student, tokenizer, encoding, adapters, inputs, task_of_row, device=device,
                          max_new_tokens=max_new_tokens, batch_size=batch_size)


def predict_hypernet(cfg: Any, method: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                     log: Log) -> MethodPredictions:
    export = RunPaths.of(cfg).finetune_export(method)
    if not (export / EXPORT_CONFIG).is_file():
        log(f"evaluate: {method}: no export at {export} (run the pipeline's finetune stage); no numbers")
        return _none(splits)
    # The student wraps the run's own backbone (hooks removed below): never a second copy of the weights.
    student = load_student_from_export(export, backbone=bb.model, device=bb.device, backend=cfg.hypernet.kernel)
    settings = prompt_settings(cfg, bb.arch)
    try:
        return _timed(splits, bb.device, lambda tasks: student_predict(
            student, bb.tokenizer, tasks, settings, device=bb.device, max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size))
    finally:
        student.hooks.remove()


def predict_method(cfg: Any, method: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                   log: Log = print) -> MethodPredictions:
    if method == "no_ft":
        return predict_no_ft(cfg, splits, bb, log)
    if method in BASELINES:
        return predict_baseline(cfg, method, splits, bb, log)
    if method == "teacher":
        return predict_teacher(cfg, splits, bb, log)
    if method in HYPERNET_METHODS:
        return predict_hypernet(cfg, method, splits, bb, log)
    raise ConfigError(f"eval.methods: unknown method {method!r}; expected some of {list(ALL_METHODS)}")
