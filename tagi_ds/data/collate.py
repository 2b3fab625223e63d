"""Tokenize (task, instance) pairs into tensors for T5 (seq2seq) and LLaMA (causal) backbones.

Two batch kinds:
- `StudentBatch`: the instruction and the instance input stay apart. The instruction (definition + examples) is
  tokenized once per task in the batch (`instr_ids`, one row per task) and every instance points at its task's
  row through `task_ids`; the backbone input is the instance part alone (`prompts.build_task_input`).
- `FullPromptBatch`: one string per instance, for the teacher and the Tk-Instruct / no-instruction baselines
  (`prompts.build_source` or `prompts.no_instruction_input`).

Targets. T5: `labels` = target ids + eos, padded with -100; `decoder_input_ids` is None because
T5ForConditionalGeneration shifts the labels itself. Causal: `input_ids` = prompt + target + eos (right-padded),
`labels` = -100 on the prompt and the padding. With `for_generation=True` there are no labels and causal prompts are
left-padded so that generation continues every row from its last column.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Literal, Optional, Sequence

import torch

from ..errors import DataError
from . import prompts
from .tasks import Instance, Task

Arch = Literal["t5", "llama"]
Pair = tuple[Task, Instance]
IGNORE = -100  # label value the loss skips
# Inference batches (generation, rank classification, the instructions of an evaluation unit) are padded to a
# multiple of this many tokens (training pads its instructions to INSTRUCTION_BUCKET, below): the CPU
# kernels keep one compiled kernel per distinct shape (oneDNN's primitive cache and ideep's LRU cache for bf16
# matmuls, torch's brgemm cache behind CPU flash attention, which is unbounded), so exact widths made host memory
# grow with every new length an evaluation met, i.e. with the number of tasks (issue #17). Padded columns are masked.
WIDTH_BUCKET = 64
# Training pads a micro batch's instructions (train/hypernet_loop.bucket_instructions) to a multiple of this: a
# run meets at most max_source_length / 8 widths (bounded, unlike an evaluation's units), and the instruction pass
# pays ~4 padded tokens a row, not ~32 (bench/train_step.py: the TAGI step ~3% cheaper at hidden 512 x 8 layers).
INSTRUCTION_BUCKET = 8


def bucket_width(width: int, multiple: int = WIDTH_BUCKET) -> int:
    """`width` rounded up to a multiple of `multiple` (0 stays 0; multiple <= 1 leaves it unchanged)."""
    return width if multiple <= 1 else -(-width // multiple) * multiple


@dataclass(frozen=True)
class PromptSettings:
    """Plain prompt/tokenization settings (the recipe fills them from `cfg.data` and `cfg.backbone.arch`)."""

    arch: Arch = "t5"
    num_pos: int = 2                       # positive examples in the instruction (Def + 2 Pos)
    add_definition: bool = True
    max_source_length: int = 1024          # full Tk-Instruct prompt (teacher / baselines)
    max_instruction_length: Optional[int] = None  # student instruction; None = max_source_length
    max_input_length: int = 128            # student backbone input (instance part)
    max_target_length: int = 128
    instruction_overflow: Literal["truncate", "error"] = "truncate"
    # The student's input continues an instruction prefix (LLaMA fusion: hypernet.fusion): no bos of its own.
    # False for a student without fusion, whose input is the whole sequence and starts with bos.
    student_input_after_prefix: bool = True

    @property
    def instruction_length(self) -> int:
        return self.max_instruction_length or self.max_source_length


@dataclass
class StudentBatch:
    instr_ids: torch.Tensor          # (n_tasks, Li) one row per task in the batch
    instr_mask: torch.Tensor         # (n_tasks, Li)
    task_ids: torch.Tensor           # (N,) row of instr_ids for each instance
    input_ids: torch.Tensor          # (N, Lx) backbone input (causal training: input + target)
    attention_mask: torch.Tensor     # (N, Lx)
    labels: Optional[torch.Tensor]   # (N, Ly) t5 / (N, Lx) causal; None for generation
    decoder_input_ids: Optional[torch.Tensor]  # None: T5 derives them from labels
    task_names: list[str]            # (n_tasks,)
    instance_ids: list[str]          # (N,)

    def to(self, device) -> "StudentBatch":
        return _to(self, device)


@dataclass
class FullPromptBatch:
    input_ids: torch.Tensor          # (N, Ls)
    attention_mask: torch.Tensor     # (N, Ls)
    labels: Optional[torch.Tensor]   # (N, Ly) t5 / (N, Ls) causal; None for generation
    decoder_input_ids: Optional[torch.Tensor]
    task_ids: torch.Tensor           # (N,) index into task_names (per-task teachers batched together)
    task_names: list[str]            # (n_tasks,)
    instance_ids: list[str]          # (N,)

    def to(self, device) -> "FullPromptBatch":
        return _to(self, device)


def _to(batch, device):
    for fl in fields(batch):
        value = getattr(batch, fl.name)
        if isinstance(value, torch.Tensor):
            setattr(batch, fl.name, value.to(device))
    return batch


# ------------------------------------------------------------------------------------------------- tokens
def pad_id(tokenizer) -> int:
    """The pad token, or eos for tokenizers without one (LLaMA); padded positions are masked anyway."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("tokenizer has neither a pad nor an eos token")
    return int(pid)


def encode_prompt(tokenizer, text: str, max_length: int) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (T5: text + eos; LLaMA: bos + text), cut to max_length."""
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def encode_student_input(tokenizer, text: str, max_length: int, after_prefix: bool) -> list[int]:
    """The student backbone's input ids (the instance part), at most max_length, the start kept.

    after_prefix (a LLaMA student with fusion): the input continues the instruction's KV prefix, whose row already
    starts with the tokenizer's bos, so a leading bos is dropped here: the backbone reads [bos instruction ; input],
    one bos, the sequence Tk-Instruct's prompt would be. Tokenizers that add no bos (T5: text + eos, an encoder
    sequence of its own) and students without a prefix get `encode_prompt`'s ids unchanged."""
    ids = encode_prompt(tokenizer, text, max_length)
    bos = tokenizer.bos_token_id
    if not after_prefix or bos is None or not ids or ids[0] != bos:
        return ids
    return encode_prompt(tokenizer, text, max_length + 1)[1:]  # one longer, so the cap still holds without bos


def encode_target(tokenizer, text: str, max_length: int) -> list[int]:
    """Target ids + eos, at most `max_length` tokens in all (eos always kept)."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token; targets need one to mark their end")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(max_length - 1, 0)]
    return list(ids) + [int(tokenizer.eos_token_id)]


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False, multiple: int = 1) -> torch.Tensor:
    """(N, W) tensor of rows padded with `value` on the right (or left); W = the longest row, rounded up to a
    multiple of `multiple` (`bucket_width`)."""
    width = bucket_width(max((len(r) for r in rows), default=0), multiple)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return pad_rows([[1] * len(r) for r in rows], 0, left)


def _encode_pairs(prompt_rows: list[list[int]], target_texts: Optional[list[str]], tokenizer, arch: Arch,
                  max_target_length: int, for_generation: bool):
    """(input_ids, attention_mask, labels) for prompts (+ targets) in the layout of `arch`."""
    pid = pad_id(tokenizer)
    if for_generation or target_texts is None:
        left = arch == "llama"
        return pad_rows(prompt_rows, pid, left), _mask(prompt_rows, left), None
    targets = [encode_target(tokenizer, t, max_target_length) for t in target_texts]
    if arch == "t5":
        return pad_rows(prompt_rows, pid), _mask(prompt_rows), pad_rows(targets, IGNORE)
    if arch == "llama":
        seqs = [p + t for p, t in zip(prompt_rows, targets)]
        labels = [[IGNORE] * len(p) + t for p, t in zip(prompt_rows, targets)]
        return pad_rows(seqs, pid), _mask(seqs), pad_rows(labels, IGNORE)
    raise DataError(f"unknown backbone arch {arch!r}; expected 't5' or 'llama'")


def _group(pairs: Sequence[Pair]) -> tuple[list[Task], torch.Tensor]:
    """Tasks in order of first appearance and, per pair, the index of its task."""
    order: dict[str, int] = {}
    tasks: list[Task] = []
    ids = []
    for task, _ in pairs:
        if task.name not in order:
            order[task.name] = len(tasks)
            tasks.append(task)
        ids.append(order[task.name])
    return tasks, torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- instructions
def instruction_ids(task: Task, tokenizer, settings: PromptSettings) -> list[int]:
    """Token ids of TAGI's instruction for `task` (examples dropped to fit, then cut or refused when too long)."""
    max_len = settings.instruction_length
    text = prompts.build_instruction(task, settings.num_pos, settings.add_definition, tokenizer, max_len)
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) > max_len:
        if settings.instruction_overflow == "error":
            raise DataError(f"task '{task.name}': instruction is {len(ids)} tokens, over max_instruction_length "
                            f"{max_len} (data.instruction_overflow=error); shorten the definition or raise the limit")
        warnings.warn(f"task '{task.name}': instruction is {len(ids)} tokens, cut to max_instruction_length "
                      f"{max_len} (data.instruction_overflow=truncate; set it to error to refuse instead)",
                      stacklevel=2)
        ids = list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"])
    return ids


def collate_student(pairs: Sequence[Pair], tokenizer, settings: PromptSettings, for_generation: bool = False,
                    targets: Optional[Sequence[str]] = None,
                    instruction_cache: Optional[dict[str, list[int]]] = None) -> StudentBatch:
    """Student batch: instructions once per task, instance inputs per pair. `targets` overrides the labels
    (e.g. one row per answer choice for rank classification); `instruction_cache` (task name → ids) is filled
    and reused across calls."""
    if not pairs:
        raise ValueError("collate_student needs at least one (task, instance) pair")
    tasks, task_ids = _group(pairs)
    cache = instruction_cache if instruction_cache is not None else {}
    instr_rows = []
    for task in tasks:
        if task.name not in cache:
            cache[task.name] = instruction_ids(task, tokenizer, settings)
        instr_rows.append(cache[task.name])
    prompt_rows = [encode_student_input(tokenizer, prompts.build_task_input(inst), settings.max_input_length,
                                        settings.student_input_after_prefix) for _, inst in pairs]
    target_texts = list(targets) if targets is not None else [inst.label for _, inst in pairs]
    input_ids, attention_mask, labels = _encode_pairs(prompt_rows, target_texts, tokenizer, settings.arch,
                                                      settings.max_target_length, for_generation)
    return StudentBatch(instr_ids=pad_rows(instr_rows, pad_id(tokenizer)), instr_mask=_mask(instr_rows),
                        task_ids=task_ids, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        decoder_input_ids=None, task_names=[t.name for t in tasks],
                        instance_ids=[inst.id for _, inst in pairs])


def full_prompt_text(task: Task, instance: Instance, tokenizer, settings: PromptSettings,
                     with_instruction: bool = True) -> str:
    """The teacher / Tk-Instruct source (`with_instruction`) or the no-instruction baseline's source."""
    if not with_instruction:
        return prompts.no_instruction_input(instance)
    return prompts.build_source(task, instance, settings.num_pos, settings.add_definition, tokenizer,
                                settings.max_source_length)


def collate_full(pairs: Sequence[Pair], tokenizer, settings: PromptSettings, with_instruction: bool = True,
                 for_generation: bool = False, targets: Optional[Sequence[str]] = None) -> FullPromptBatch:
    """One full prompt per pair (teacher, Tk-Instruct baseline; `with_instruction=False`: no-instruction one)."""
    if not pairs:
        raise ValueError("collate_full needs at least one (task, instance) pair")
    tasks, task_ids = _group(pairs)
    # The no-instruction baseline reads only the instance part, so its cap is the student's input length.
    max_len = settings.max_source_length if with_instruction else settings.max_input_length
    prompt_rows = [encode_prompt(tokenizer, full_prompt_text(t, i, tokenizer, settings, with_instruction), max_len)
                   for t, i in pairs]
    target_texts = list(targets) if targets is not None else [inst.label for _, inst in pairs]
    input_ids, attention_mask, labels = _encode_pairs(prompt_rows, target_texts, tokenizer, settings.arch,
                                                      settings.max_target_length, for_generation)
    return FullPromptBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                           decoder_input_ids=None, task_ids=task_ids, task_names=[t.name for t in tasks],
                           instance_ids=[inst.id for _, inst in pairs])


# ------------------------------------------------------------------------------------------ encoded pairs
@dataclass(frozen=True)
class EncodedPair:
    """One training example, tokenized once: the full prompt's ids and the target ids (+ eos)."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]


def _round_up(rows: list[list[int]], value: int, multiple: int) -> list[list[int]]:
    """Pad the first row so the batch width becomes a multiple of `multiple` (pad_rows pads the rest to it)."""
    if multiple <= 1 or not rows:
        return rows
    width = max(len(r) for r in rows)
    target = -(-width // multiple) * multiple
    return [rows[0] + [value] * (target - len(rows[0]))] + rows[1:]


def assemble(pairs: Sequence[EncodedPair], arch: str, pad: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Tensors in `collate.collate_full`'s layout (right padding). T5: input_ids = prompt, labels = target;
    causal: input_ids = prompt + target, labels = -100 on the prompt and padding.

    `pad_to_multiple_of` > 1 rounds the widths up: fixed shapes whatever the batch holds (kernel choice, and a
    unit's numbers then do not depend on the other units' lengths: see the module docstring)."""
    m = pad_to_multiple_of
    if arch == "t5":
        prompts = [list(p.prompt) for p in pairs]
        masks = _round_up([[1] * len(r) for r in prompts], 0, m)
        return {"input_ids": pad_rows(_round_up(prompts, pad, m), pad), "attention_mask": pad_rows(masks, 0),
                "labels": pad_rows(_round_up([list(p.target) for p in pairs], IGNORE, m), IGNORE)}
    if arch == "llama":
        seqs = [list(p.prompt) + list(p.target) for p in pairs]
        labels = [[IGNORE] * len(p.prompt) + list(p.target) for p in pairs]
        return {"input_ids": pad_rows(_round_up(seqs, pad, m), pad),
                "attention_mask": pad_rows(_round_up([[1] * len(s) for s in seqs], 0, m), 0),
                "labels": pad_rows(_round_up(labels, IGNORE, m), IGNORE)}
    raise DataError(f"backbone arch must be 't5' or 'llama', got {arch!r}")


# ------------------------------------------------------------------------------------------ dataset adapter
class TaskInstanceDataset:
    """Map-style dataset over (task_idx, instance_idx) keys, the keys `TaskGroupedSampler` yields."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)

    def __getitem__(self, key: tuple[int, int]) -> Pair:
        t, i = key
        task = self.tasks[t]
        return task, task.instances[i]

    def __len__(self) -> int:
        return sum(len(t.instances) for t in self.tasks)

    @property
    def task_sizes(self) -> list[int]:
        return [len(t.instances) for t in self.tasks]


def decode_generated(tokenizer, tokens: torch.Tensor, eos_ids: Sequence[int]) -> list[str]:
    """Generated ids (N, T) → text per row, cut at the first EOS (every decoding path: evaluation and predict)."""
    out = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out
