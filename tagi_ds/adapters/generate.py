"""`tagi-ds generate-adapter`: an instruction → a standard PEFT LoRA adapter directory, from a hypernetwork export.

    tagi-ds generate-adapter --hypernet runs/x/finetune/tagi/export --instruction "Answer yes or no." --out my_adapter
    tagi-ds generate-adapter --hypernet DIR --task-file tasks/task1624_x.json --out my_adapter    # Def + 2 Pos

The export loads WITHOUT DeepSpeed (run/export_io.py), with its frozen backbone from the recorded id (or --backbone);
the instruction is encoded once by the backbone, the hypernetwork makes A/B for every target module, and the result
is written with peft_io, so `peft.PeftModel.from_pretrained(backbone, DIR)` loads it. Adapters are cached on disk
(adapter_cache.py): asking again for the same instruction runs no hypernetwork forward.

With fusion (the default TAGI student), the decoder also attends to the instruction's states: the adapter alone
lacks them, so a PEFT model with it is the student WITHOUT fusion. `tagi-ds predict` runs the full model.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data.collate import pad_id, pad_rows
from ..data.prompts import build_instruction
from ..data.sni import load_sni_task
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, DataError, TagiError
from ..modeling.lora import Adapters
from ..modeling.tagi import TagiStudent, TaskEncoding
from .adapter_cache import AdapterCache, TaskAdapters, default_cache_dir, export_fingerprint
from ..run.peft_io import ADAPTER_CONFIG, write_peft_adapter

TASK_TYPE = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM"}
ADAPTER_META = "tagi_adapter.json"
FUSION_NOTE = ("note: this hypernetwork was trained with instruction fusion (the decoder also attends to the "
               "instruction's states); the PEFT adapter alone does not carry them, so PeftModel gives the student "
               "WITHOUT fusion. `tagi-ds predict` runs the full model.")


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadedExport:
    """A hypernetwork export ready for inference: student (backbone + hypernetwork), tokenizer and provenance."""

    student: TagiStudent
    tokenizer: object
    config: dict          # the export's config (run/export_io.py: backbone_id, arch, r, alpha, fusion, ...)
    export_dir: Path
    backbone_id: str      # what the backbone was loaded from (--backbone, else the export's record)
    export_hash: str      # sha256 of the export's config.json (it holds the weights' sha256)

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["alpha"])

    def cache(self, root: Optional[str | Path]) -> AdapterCache:
        return AdapterCache(root or default_cache_dir(), self.export_hash, self.backbone_id)


def _check_backbone(export_dir: Path, cfg: dict, backbone_id: str) -> None:
    """Refuse a backbone whose architecture or LoRA targets differ from the export's, naming both."""
    from transformers import AutoConfig

    from ..modeling.backbone import TargetSpec, detect_arch, target_specs

    try:
        bcfg = AutoConfig.from_pretrained(backbone_id)
    except (OSError, ValueError) as e:
        raise ArtifactMismatchError(f"backbone {backbone_id}: cannot read its config ({e}); pass --backbone with the "
                                    f"folder or hub id of {cfg.get('backbone_id')}") from None
    saved = [TargetSpec(**s) for s in cfg["hypernet"]["specs"]]
    try:
        arch = detect_arch(bcfg)
        same = arch == cfg["arch"] and target_specs(bcfg, cfg["target_modules"]) == saved
    except TagiError:
        arch, same = getattr(bcfg, "model_type", "?"), False
    if not same:
        raise ArtifactMismatchError(
            f"{export_dir}: this hypernetwork export was made for backbone {cfg['backbone_id']} "
            f"({cfg['arch']}, {len(saved)} LoRA targets of kinds {cfg['target_modules']}), but backbone "
            f"{backbone_id} ({arch}) has other LoRA target shapes; use the export's backbone")


def load_export(export_dir: str | Path, backbone: Optional[str] = None, tokenizer: Optional[str] = None,
                device: str | torch.device = "cpu") -> LoadedExport:
    """Load a hypernetwork export (no DeepSpeed) with its backbone and tokenizer; ArtifactMismatchError when the
    backbone is not the one the export was made for."""
    from transformers import AutoTokenizer

    from ..modeling.backbone import load_backbone
    from ..run.export_io import load_student_from_export, read_export_config

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ArtifactMismatchError(f"{export_dir}: not a directory; --hypernet expects a hypernetwork export "
                                    f"folder (config.json + trainable.safetensors)")
    cfg = read_export_config(export_dir)
    backbone_id = str(backbone or cfg["backbone_id"])
    _check_backbone(export_dir, cfg, backbone_id)
    model, _ = load_backbone(backbone_id, cfg["arch"], cfg.get("dtype", "float32"))
    student = load_student_from_export(export_dir, backbone=model, device=device)
    tok_id = tokenizer or (backbone if backbone else cfg.get("tokenizer") or backbone_id)
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_id))
    except (OSError, ValueError) as e:
        raise ArtifactMismatchError(f"tokenizer {tok_id}: cannot be loaded ({e}); pass --tokenizer") from None
    return LoadedExport(student, tok, cfg, export_dir, backbone_id, export_fingerprint(export_dir))


# ------------------------------------------------------------------------------------------------ instructions
def read_task_file(path: str | Path) -> Task:
    """One SNI task JSON file (DataError naming the file when it is a directory, missing, or not valid JSON)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; --task-file expects one SNI task JSON file "
                        f"(e.g. tasks/task1624_disfl_qa_question_yesno_classification.json)")
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    return load_sni_task(path, max_instances=None, cap="first")


def task_instruction(task: Task, tokenizer, max_length: int = 1024, num_pos: int = 2) -> str:
    """TAGI's instruction of an SNI task: definition + `num_pos` positive examples (as in training)."""
    return build_instruction(task, num_pos=num_pos, add_definition=True, tokenizer=tokenizer, max_length=max_length)


def tokenize_instructions(tokenizer, texts: Sequence[str], max_length: int,
                          overflow: str = "truncate") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (n_tasks, Li), right-padded; the tokenizer's own special tokens, as collate_student does.
    An instruction over `max_length` tokens is cut with a warning (`overflow="truncate"`) or refused ("error")."""
    rows = []
    for i, t in enumerate(texts):
        ids = list(tokenizer(t)["input_ids"])
        if len(ids) > max_length:
            what = (f"instruction {i + 1} of {len(texts)} is {len(ids)} tokens, over --max-instruction-length "
                    f"{max_length}")
            if overflow == "error":
                raise DataError(f"{what} (--instruction-overflow error); shorten it or raise the limit")
            warnings.warn(f"{what}: cut to {max_length} tokens (--instruction-overflow error refuses instead)",
                          stacklevel=2)
            ids = list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
        rows.append(ids)
    if any(len(r) == 0 for r in rows):
        raise DataError("an instruction is empty after tokenization; give a non-empty instruction")
    return pad_rows(rows, pad_id(tokenizer)), pad_rows([[1] * len(r) for r in rows], 0)


# ------------------------------------------------------------------------------------------------ adapters
def task_slice(adapters: Adapters, index: int) -> TaskAdapters:
    """Task `index` of batched adapters: {type: (A (L, r, d_in), B (L, d_out, r))}, the peft_io layout."""
    return {mt: (a[index], b[index]) for mt, (a, b) in adapters.items()}


def stack_tasks(per_task: Sequence[TaskAdapters], device, dtype) -> Adapters:
    """Batched adapters {type: (A (n_tasks, L, r, d_in), B (n_tasks, L, d_out, r))} from one dict per task."""
    return {mt: (torch.stack([t[mt][0] for t in per_task]).to(device, dtype),
                 torch.stack([t[mt][1] for t in per_task]).to(device, dtype)) for mt in per_task[0]}


@dataclass
class GeneratedAdapters:
    adapters: Adapters                  # (n_tasks, ...) in the order of the instructions given
    encoding: Optional[TaskEncoding]    # all tasks' instruction encoding, when asked for (fusion needs it)
    n_generated: int                    # tasks that went through the hypernetwork (cache misses)


@torch.no_grad()
def adapters_for_instructions(student: TagiStudent, tokenizer, instructions: Sequence[str], *,
                              max_length: int = 1024, cache: Optional[AdapterCache] = None,
                              need_encoding: bool = False, r: Optional[int] = None,
                              alpha: Optional[float] = None, overflow: str = "truncate") -> GeneratedAdapters:
    """Adapters of each instruction: from the cache when there, else encoded + hypernetwork (and then cached).

    The backbone encodes only the misses unless `need_encoding` (fusion needs every task's states anyway)."""
    device = next(student.hypernet.parameters()).device
    dtype = next(student.hypernet.parameters()).dtype
    per_task: list[Optional[TaskAdapters]] = [None] * len(instructions)
    if cache is not None:
        for i, text in enumerate(instructions):
            per_task[i] = cache.load(text, student.specs)
    misses = [i for i, a in enumerate(per_task) if a is None]
    encoding = None
    if misses or need_encoding:
        todo = list(range(len(instructions))) if need_encoding else misses
        ids, mask = tokenize_instructions(tokenizer, [instructions[i] for i in todo], max_length, overflow)
        dev = next(student.backbone.parameters()).device
        enc = student.encode_instructions(ids.to(dev), mask.to(dev))
        if need_encoding:
            encoding = enc
        if misses:
            rows = [todo.index(i) for i in misses]
            generated = student.generate_adapters(enc.select(rows))
            r = int(r if r is not None else student.hypernet.r)
            alpha = float(alpha if alpha is not None else student.lora_scale * r)
            for j, i in enumerate(misses):
                per_task[i] = task_slice(generated, j)
                if cache is not None:
                    cache.store(instructions[i], student.specs, per_task[i], r=r, alpha=alpha,
                                task_type=TASK_TYPE[student.arch])
    return GeneratedAdapters(stack_tasks(per_task, device, dtype), encoding, len(misses))


def write_generated_adapter(student: TagiStudent, adapters: TaskAdapters, out_dir: str | Path, *, r: int,
                            alpha: float, base_model: str, meta: Optional[dict] = None) -> Path:
    """Publish one task's generated adapter as a PEFT directory (atomic), with `tagi_adapter.json` beside it."""
    info = {"fusion": bool(student.fusion), "arch": student.arch, **(meta or {})}
    if student.fusion:
        info["note"] = FUSION_NOTE
    return write_peft_adapter(out_dir, student.specs, adapters, r=r, alpha=alpha, base_model=base_model,
                              task_type=TASK_TYPE[student.arch], extra_files={ADAPTER_META: info})


def check_out_dir(out: Path) -> None:
    """--out must be new, empty, or an adapter directory we may replace: never wipe a folder of other files."""
    if out.exists() and not out.is_dir():
        raise TagiError(f"--out {out}: exists and is a file; give a directory path for the adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / ADAPTER_CONFIG).is_file():
        raise TagiError(f"--out {out}: exists, is not empty and holds no {ADAPTER_CONFIG}; refusing to replace it")


# ------------------------------------------------------------------------------------------------ CLI
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate-adapter and predict."""
    p.add_argument("--hypernet", required=True, help="hypernetwork export folder (<stage dir>/export)")
    p.add_argument("--backbone", default=None, help="backbone folder or hub id (default: the one the export records)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: --backbone, else the export's record)")
    p.add_argument("--max-instruction-length", type=int, default=1024, help="instruction tokens (default 1024)")
    p.add_argument("--instruction-overflow", choices=("truncate", "error"), default="truncate",
                   help="an instruction over --max-instruction-length: cut it with a warning, or refuse (error)")
    p.add_argument("--num-pos", type=int, default=2, help="positive examples in a task file's instruction")
    p.add_argument("--cache-dir", default=None, help="adapter cache (default: $TAGI_DS_ADAPTER_CACHE or "
                                                    "~/.cache/tagi-ds/adapters)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the adapter cache")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def default_device(device: Optional[str]) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--instruction", help="the task instruction, as text")
    src.add_argument("--task-file", help="an SNI task JSON file (its Definition + --num-pos positive examples)")
    p.add_argument("--out", required=True, help="output PEFT adapter directory")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_dir(out)
    task = read_task_file(args.task_file) if args.task_file else None  # bad file: fail before loading anything
    if task is None and not args.instruction.strip():
        raise DataError("--instruction is empty; give the task instruction as text")
    loaded = load_export(args.hypernet, args.backbone, args.tokenizer, default_device(args.device))
    text = args.instruction if task is None else task_instruction(task, loaded.tokenizer, args.max_instruction_length,
                                                                  args.num_pos)
    cache = None if args.no_cache else loaded.cache(args.cache_dir)
    gen = adapters_for_instructions(loaded.student, loaded.tokenizer, [text], max_length=args.max_instruction_length,
                                    cache=cache, r=loaded.r, alpha=loaded.alpha, overflow=args.instruction_overflow)
    meta = {"instruction": text, "task": task.name if task else None, "hypernet_export": str(loaded.export_dir),
            "export_sha256": loaded.export_hash, "backbone_id": loaded.backbone_id}
    write_generated_adapter(loaded.student, task_slice(gen.adapters, 0), out, r=loaded.r, alpha=loaded.alpha,
                            base_model=loaded.backbone_id, meta=meta)
    how = "generated" if gen.n_generated else "from the adapter cache"
    print(f"wrote PEFT adapter {out} ({how}; r={loaded.r}, alpha={loaded.alpha:g}, "
          f"{len(loaded.student.specs)} target modules, backbone {loaded.backbone_id})")
    if loaded.student.fusion:
        print(FUSION_NOTE)
    return 0
