"""`tagi-ds predict`: batched greedy predictions of the full TAGI student (generated adapter + fusion) from an export.

    tagi-ds predict --hypernet DIR --instruction "Answer yes or no." --inputs inputs.jsonl --out preds.jsonl
    tagi-ds predict --hypernet DIR --task-file a.json --task-file b.json --inputs inputs.jsonl --out preds.jsonl
    tagi-ds predict --hypernet DIR --task-file a.json --out preds.jsonl           # the task file's own instances

inputs.jsonl, one JSON object per line: {"input": str, "id": str (optional), "task": str (which --task-file, by its
name = file stem; required with several), "instruction": str (only when neither --instruction nor --task-file)}.
preds.jsonl (atomic): {"id", "task", "prediction"} per input, in input order.

One task: its adapter is generated once and MERGED into a copy of the weights, so each instance costs what the bare
backbone costs (plus fusion's attention over the instruction states, when the export has fusion). Several tasks:
adapters stay in the batched LoRA hooks (each row its task's adapter). `--no-merge` forces the hooks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..data.collate import encode_student_input
from ..data.prompts import build_task_input
from ..data.tasks import Instance, Task
from ..data.jsonl import iter_jsonl_objects
from ..errors import DataError, TagiError
from ..io_utils import atomic_write_text
from ..modeling.lora import Adapters, merge_into_copy
from ..modeling.tagi import TagiStudent, TaskEncoding
from ..run.decode import decode_student
from .generate import (add_common_arguments, adapters_for_instructions, default_device, load_export, read_task_file,
                       task_instruction)


@dataclass(frozen=True)
class InputRow:
    id: str
    input: str
    task: Optional[str] = None
    instruction: Optional[str] = None


# ------------------------------------------------------------------------------------------------ inputs
def read_inputs(path: str | Path) -> list[InputRow]:
    """Rows of an inputs.jsonl; DataError naming the line for anything malformed."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        raise DataError(f"{path}: no such inputs file (expected a .jsonl file, one JSON object per line)")
    rows: list[InputRow] = []
    for lineno, obj in iter_jsonl_objects(path, 'a JSON object with an "input" string'):
        if not isinstance(obj.get("input"), str):
            raise DataError(f"{path}:{lineno}: key \"input\" must be a string"
                            + ("" if "input" in obj else " and is missing"))
        for key in ("task", "instruction"):
            if key in obj and not isinstance(obj[key], str):
                raise DataError(f"{path}:{lineno}: key \"{key}\" must be a string, got {type(obj[key]).__name__}")
        rid = obj.get("id", str(len(rows)))
        if not isinstance(rid, (str, int)):
            raise DataError(f"{path}:{lineno}: key \"id\" must be a string or an integer")
        rows.append(InputRow(str(rid), obj["input"], obj.get("task"), obj.get("instruction")))
    if not rows:
        raise DataError(f"{path}: no inputs (the file is empty)")
    return rows


@dataclass
class Plan:
    """What to predict: task names, per task a Task (from a file) or an instruction text, and each row's task."""

    names: list[str]
    sources: list[Task | str]
    rows: list[InputRow]
    task_of_row: list[int]


def plan_tasks(rows: Optional[list[InputRow]], instruction: Optional[str], tasks: Sequence[Task],
               inputs_path: str = "inputs") -> Plan:
    """Match input rows to tasks (errors name the offending line's id and the known task names)."""
    if instruction is not None:
        if not instruction.strip():
            raise DataError("--instruction is empty; give the task instruction as text")
        if rows is None:
            raise DataError("--inputs is required with --instruction")
        return Plan(["instruction"], [instruction], rows, [0] * len(rows))
    if tasks:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise DataError(f"--task-file: two task files have the same name {names}; task names must differ")
        if rows is None:  # the task files' own instances
            rows = [InputRow(inst.id, inst.input, t.name) for t in tasks for inst in t.instances]
        index = {n: i for i, n in enumerate(names)}
        which = []
        for row in rows:
            if row.task is None:
                if len(tasks) > 1:
                    raise DataError(f"{inputs_path}: input id {row.id!r} has no \"task\"; with several --task-file "
                                    f"each input names its task, one of {names}")
                which.append(0)
            elif row.task not in index:
                raise DataError(f"{inputs_path}: input id {row.id!r} has task {row.task!r}, not one of the task "
                                f"files' names {names}")
            else:
                which.append(index[row.task])
        return Plan(names, list(tasks), rows, which)
    if rows is None:
        raise DataError("give --instruction TEXT, --task-file FILE, or an inputs file whose lines carry "
                        "an \"instruction\"")
    texts: dict[str, int] = {}
    names, which = [], []
    for row in rows:
        if row.instruction is None:
            raise DataError(f"{inputs_path}: input id {row.id!r} has no \"instruction\"; without --instruction or "
                            f"--task-file every line needs one")
        if row.instruction not in texts:
            texts[row.instruction] = len(texts)
            names.append(row.task or f"task{len(texts) - 1}")
        which.append(texts[row.instruction])
    return Plan(names, list(texts), rows, which)


# ------------------------------------------------------------------------------------------------ prediction
@contextlib.contextmanager
def merged_backbone(student: TagiStudent, adapters: Adapters, task_index: int = 0) -> Iterator[None]:
    """Inside, the student's backbone is a copy with task `task_index`'s ΔW merged in (no hooks on it), so the
    LoRA costs nothing per instance; the original backbone (with its hooks) is restored on exit."""
    merged = merge_into_copy(student.backbone, student.specs, adapters, task_index, student.lora_scale)
    original = student.backbone
    student.backbone = merged
    try:
        yield
    finally:
        student.backbone = original


@torch.no_grad()
def predict(student: TagiStudent, tokenizer, instructions: Sequence[str], inputs: Sequence[str],
            task_of_row: Sequence[int], *, merge: bool = True, batch_size: int = 16, max_input_length: int = 128,
            max_instruction_length: int = 1024, max_new_tokens: int = 128, cache=None,
            r: Optional[int] = None, alpha: Optional[float] = None, overflow: str = "truncate") -> list[str]:
    """Greedy predictions for `inputs` (row i belongs to task task_of_row[i] of `instructions`).

    One task and `merge`: adapter merged into a copy of the weights. Otherwise: batched hooks, rows of any tasks."""
    gen = adapters_for_instructions(student, tokenizer, instructions, max_length=max_instruction_length, cache=cache,
                                    need_encoding=student.fusion, r=r, alpha=alpha, overflow=overflow)
    device = next(student.backbone.parameters()).device
    encoding = gen.encoding if gen.encoding is not None else _no_fusion_encoding(len(instructions), device)
    rows = [encode_student_input(tokenizer, build_task_input(Instance("", t, ("",), "")), max_input_length,
                                 student.fusion) for t in inputs]  # LLaMA fusion: no second bos after the prefix
    ctx = merged_backbone(student, gen.adapters) if merge and len(instructions) == 1 else contextlib.nullcontext()
    with ctx:
        return decode_student(student, tokenizer, encoding, gen.adapters, rows, task_of_row, device=device,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)


def _no_fusion_encoding(n_tasks: int, device) -> TaskEncoding:
    """Without fusion the student reads nothing from the encoding but its task count: a placeholder."""
    z = torch.zeros(n_tasks, 1, device=device)
    return TaskEncoding(z, z[..., None], z.long(), None)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--instruction", help="the task instruction, as text (one task)")
    src.add_argument("--task-file", action="append", default=[],
                     help="an SNI task JSON file; repeat for several tasks (inputs then name their \"task\")")
    p.add_argument("--inputs", default=None,
                   help="inputs.jsonl (default with --task-file: the task files' own instances)")
    p.add_argument("--out", required=True, help="predictions .jsonl, written atomically")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-input-length", type=int, default=128, help="input tokens per instance")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generated tokens at most")
    p.add_argument("--no-merge", action="store_true", help="keep the adapter in hooks even for one task")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise TagiError(f"--out {out}: is a directory; give the path of the predictions .jsonl file")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise TagiError("--batch-size and --max-new-tokens must be at least 1")
    # Everything about the inputs is checked before any model loads, and nothing is written until the end.
    tasks = [read_task_file(f) for f in args.task_file]
    rows = read_inputs(args.inputs) if args.inputs else None
    plan = plan_tasks(rows, args.instruction, tasks, args.inputs or "inputs")
    loaded = load_export(args.hypernet, args.backbone, args.tokenizer, default_device(args.device))
    texts = [s if isinstance(s, str) else task_instruction(s, loaded.tokenizer, args.max_instruction_length,
                                                           args.num_pos) for s in plan.sources]
    cache = None if args.no_cache else loaded.cache(args.cache_dir)
    preds = predict(loaded.student, loaded.tokenizer, texts, [r.input for r in plan.rows], plan.task_of_row,
                    merge=not args.no_merge, batch_size=args.batch_size, max_input_length=args.max_input_length,
                    max_instruction_length=args.max_instruction_length, max_new_tokens=args.max_new_tokens,
                    cache=cache, r=loaded.r, alpha=loaded.alpha, overflow=args.instruction_overflow)
    lines = [json.dumps({"id": r.id, "task": plan.names[t], "prediction": p}, ensure_ascii=False)
             for r, t, p in zip(plan.rows, plan.task_of_row, preds)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    mode = "merged adapter" if (len(texts) == 1 and not args.no_merge) else "batched LoRA hooks"
    print(f"wrote {len(lines)} predictions for {len(texts)} task(s) to {out} ({mode}"
          f"{', instruction fusion' if loaded.student.fusion else ''})")
    return 0
