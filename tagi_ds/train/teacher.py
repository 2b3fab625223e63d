"""Stage `teacher`: per-unit (task or category) LoRA teachers on the frozen backbone, full Tk-Instruct prompt.

    tagi-ds teacher --config X.yaml                  # every unit, teacher.tasks_per_batch teachers per batch
    tagi-ds teacher --config X.yaml task=NAME        # one unit (a task, or a category with teacher.group_by=category)
    tagi-ds teacher --config X.yaml array_index=N    # unit N of the sorted unit list (Slurm job arrays)
    tagi-ds teacher --config X.yaml --list           # index → unit lines and the sbatch submit line

Output `<run_dir>/teachers/<unit>/`: a PEFT adapter directory (peft_io.write_peft_adapter: atomic) with
metrics.json (loss curve summary; held-back loss / ROUGE-L / EM of the teacher vs the zero-shot backbone) and
manifest.json (what produced it; its `hash` decides "same teacher"). A unit whose folder holds the same hash is
skipped; one with another hash is refused (ArtifactMismatchError names both hashes and the folder). Training
checkpoints live in `teachers/.ckpt/` until the batch is published; a rerun resumes from them (teacher.resume=auto).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..data.collate import PromptSettings, encode_prompt, encode_target, full_prompt_text, pad_id, pad_rows
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..io_utils import sha256_json
from .array import array_units, resolve_array_index, sbatch_line, tasks_for_unit
from .run_paths import RunPaths
from .teacher_batch import BatchedTeacherTrainer, EncodedPair, UnitSpec, align_label_logits, assemble

EXTRA_KEYS = ("task", "array_index")
MANIFEST_KIND = "tagi-ds/teacher"
MANIFEST_VERSION = 1
PROMPT_FORMAT = "tk-instruct-v1"
TEACHERS_SBATCH = "slurm/teachers_array.sbatch"
CACHE_SBATCH = "slurm/cache_array.sbatch"


# ------------------------------------------------------------------------------------------------ run data
@dataclass
class RunUnits:
    """The training tasks of a run, grouped into teacher units, and the held-back (seen) split by task name."""

    group_by: str
    units: list[str]
    tasks: dict[str, list[Task]]   # unit → its training tasks (sorted by name)
    seen: dict[str, Task]          # task name → held-back instances of that task

    def select(self, task: Optional[str] = None, array_index: Optional[str] = None) -> list[str]:
        """All units, or the one that `task=` (a unit name, or a task of that unit) or `array_index=` names."""
        if task is not None and array_index is not None:
            raise ConfigError("give task=NAME or array_index=N, not both")
        if array_index is not None:
            return [resolve_array_index(self.units, array_index)]
        if task is not None:
            if task in self.tasks:
                return [task]
            owner = [u for u, ts in self.tasks.items() if any(t.name == task for t in ts)]
            if owner:
                return owner
            shown = ", ".join(self.units[:8]) + (" …" if len(self.units) > 8 else "")
            raise ConfigError(f"task={task!r} is not a training task or teacher unit of this run "
                              f"({len(self.units)} units: {shown})")
        return list(self.units)


def load_run_units(cfg) -> RunUnits:
    from ..data.registry import load_run_tasks_from_config

    splits = load_run_tasks_from_config(cfg)
    train = splits["train"]
    cats = {t.name: tuple(t.categories) for t in train}
    names = [t.name for t in train]
    units = array_units(names, cats, cfg.teacher.group_by)
    by_name = {t.name: t for t in train}
    grouped = {u: [by_name[n] for n in tasks_for_unit(u, names, cats, cfg.teacher.group_by)] for u in units}
    return RunUnits(cfg.teacher.group_by, units, grouped, {t.name: t for t in splits.get("seen", [])})


def prompt_settings(cfg, arch: str) -> PromptSettings:
    d = cfg.data
    return PromptSettings(arch=arch, num_pos=d.num_pos_examples, add_definition=d.add_task_definition,
                          max_source_length=d.max_source_length, max_input_length=d.max_input_length,
                          max_target_length=d.max_target_length, instruction_overflow=d.instruction_overflow)


def encode_examples(task: Task, tokenizer, settings: PromptSettings) -> list[EncodedPair]:
    """Each instance's full prompt and target ids, exactly as `collate.collate_full` builds them (the student's
    labels come from the same `encode_target(Instance.label, max_target_length)`)."""
    out = []
    for inst in task.instances:
        prompt = encode_prompt(tokenizer, full_prompt_text(task, inst, tokenizer, settings), settings.max_source_length)
        out.append(EncodedPair(tuple(prompt), tuple(encode_target(tokenizer, inst.label, settings.max_target_length))))
    return out


def instances_fingerprint(tasks: Sequence[Task]) -> str:
    """sha256 over (task, instance id, label, input) of every instance: which data a teacher / shard saw."""
    return sha256_json([[t.name, [[i.id, i.label, i.input] for i in t.instances]] for t in tasks])


def unit_seed(seed: int, unit: str) -> int:
    return int(hashlib.sha256(f"{seed}:teacher:{unit}".encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------------ backbone
@dataclass
class LoadedBackbone:
    """The run's backbone: tokenizer, config, LoRA targets and identity at once; the weights on first use of
    `.model` (a rerun whose units are all published never loads them)."""

    tokenizer: Any
    config: Any          # the transformers model config
    arch: str
    specs: list
    path: str            # what from_pretrained was given (a PEFT adapter's base_model_name_or_path)
    identity: str        # stable id for manifests (hub id, or local folder name + config/recipe hash)
    tokenizer_hash: str
    device: torch.device
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    _model: Optional[torch.nn.Module] = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from ..modeling.backbone import load_backbone

            model, _ = load_backbone(self.path, self.arch, self.dtype, self.attn_implementation)
            if self.gradient_checkpointing:
                from .engine import enable_activation_checkpointing

                enable_activation_checkpointing(model)
            self._model = model.to(self.device)
        return self._model

    @property
    def vocab_size(self) -> int:
        """Size of the logit dimension (T5's padded 32128, not len(tokenizer))."""
        return int(self.config.vocab_size)


def backbone_identity(path: str | Path) -> str:
    """A hub id as given; a local folder as `<name>:<hash>` (tiny recipe hash, else sha256 of config.json), so the
    same weights on another machine or mount point compare equal."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    recipe = p / "recipe.json"
    if recipe.is_file():
        try:
            rec = json.loads(recipe.read_text())
            return f"{p.name}:recipe:{rec['recipe']['hash'][:16]}"
        except (ValueError, KeyError, TypeError):
            pass
    cfg = p / "config.json"
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else "noconfig"
    return f"{p.name}:config:{digest}"


def resolve_device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available (set device=cpu or auto)")
        return torch.device("cuda")
    return torch.device("cpu")


def load_run_backbone(cfg) -> LoadedBackbone:
    from transformers import AutoConfig, AutoTokenizer

    from ..distill.logit_cache import tokenizer_hash
    from ..modeling.backbone import detect_arch, target_specs
    from .backbone_stage import resolve_backbone_path

    path = resolve_backbone_path(cfg)
    if cfg.backbone.name_or_path == "auto" and not Path(path).is_dir():
        raise ArtifactMismatchError(f"{path}: no tiny backbone yet; run `tagi-ds backbone --config ...` first")
    config = AutoConfig.from_pretrained(str(path))
    arch = detect_arch(config) if cfg.backbone.arch == "auto" else cfg.backbone.arch
    tok = AutoTokenizer.from_pretrained(cfg.backbone.tokenizer or str(path))
    specs = target_specs(config, cfg.backbone.target_modules)
    b = cfg.backbone
    return LoadedBackbone(tok, config, arch, specs, str(path), backbone_identity(path), tokenizer_hash(tok),
                          resolve_device(cfg), b.dtype, b.attn_implementation, b.gradient_checkpointing)


# ------------------------------------------------------------------------------------------------ manifest
def teacher_manifest(cfg, unit: str, tasks: Sequence[Task], bb: LoadedBackbone) -> dict:
    """What makes a teacher this teacher; `hash` covers every other field."""
    body = {
        "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "unit": unit, "group_by": cfg.teacher.group_by,
        "backbone_id": bb.identity, "backbone_dtype": cfg.backbone.dtype, "arch": bb.arch,
        "tokenizer_hash": bb.tokenizer_hash,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.backbone.target_modules)},
        "prompt": {"format": PROMPT_FORMAT, "num_pos": cfg.data.num_pos_examples,
                   "add_definition": cfg.data.add_task_definition, "max_source_length": cfg.data.max_source_length,
                   "max_target_length": cfg.data.max_target_length},
        "data": {"tasks": [t.name for t in tasks], "instances": sum(len(t.instances) for t in tasks),
                 "instances_sha256": instances_fingerprint(tasks)},
        "train": {"steps": cfg.teacher.steps, "lr": cfg.teacher.lr, "batch_size": cfg.teacher.batch_size,
                  "warmup_steps": cfg.teacher.warmup_steps, "grad_clip": cfg.teacher.grad_clip},
        "seed": unit_seed(cfg.seed, unit),
    }
    return {**body, "hash": sha256_json(body)}


def published_state(teacher_dir: Path, want_hash: str) -> str:
    """'missing', 'done' (same hash) — or raise ArtifactMismatchError for a folder of another configuration."""
    if not teacher_dir.exists():
        return "missing"
    mpath = teacher_dir / "manifest.json"
    try:
        have = json.loads(mpath.read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        have = None
    if have == want_hash:
        return "done"
    raise ArtifactMismatchError(
        f"{teacher_dir}: an existing teacher was trained for another configuration (manifest hash {have!r} in "
        f"{mpath}; this run expects {want_hash!r}); remove that folder to retrain it, or use another run name")


# ------------------------------------------------------------------------------------------------ evaluation
def _generation_batch(prompts: Sequence[Sequence[int]], arch: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    left = arch == "llama"  # causal generation continues every row from its last column
    return pad_rows(prompts, pad, left), pad_rows([[1] * len(p) for p in prompts], 0, left)


@torch.no_grad()
def evaluate_rows(bb: LoadedBackbone, examples: Sequence[EncodedPair], row_unit: torch.Tensor, adapters: Optional[dict],
                  scale: float, *, max_new_tokens: int, batch_size: int) -> tuple[list[float], list[int], list[str]]:
    """Per row: summed label CE, label token count and greedy prediction, with `adapters` (row_unit picks the
    unit) or without (zero-shot backbone)."""
    model, tok, arch = bb.model, bb.tokenizer, bb.arch
    pad = pad_id(tok)
    hooks = None
    if adapters is not None:
        from ..modeling.lora import BatchedLoraHooks

        hooks = BatchedLoraHooks(model, bb.specs, scale, backend="auto")
    ce_sums, counts, preds = [], [], []
    try:
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            tids = row_unit[s:s + batch_size].to(bb.device)
            ctx = hooks.apply(adapters, tids) if hooks is not None else contextlib.nullcontext()
            with ctx:
                batch = assemble(chunk, arch, pad)
                ids, mask = batch["input_ids"].to(bb.device), batch["attention_mask"].to(bb.device)
                labels = batch["labels"].to(bb.device)
                if arch == "t5":
                    dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
                    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
                else:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                lg, tg, rows = align_label_logits(logits, labels, arch == "llama")
                ce = torch.nn.functional.cross_entropy(lg.float(), tg, reduction="none")
                ce_sums += torch.zeros(len(chunk), device=ce.device).index_add(0, rows, ce).tolist()
                counts += torch.bincount(rows, minlength=len(chunk)).tolist()
                g_ids, g_mask = _generation_batch([e.prompt for e in chunk], arch, pad)
                gen = model.generate(input_ids=g_ids.to(bb.device), attention_mask=g_mask.to(bb.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad, eos_token_id=tok.eos_token_id)
                new = gen if arch == "t5" else gen[:, g_ids.shape[1]:]
                preds += [p.strip() for p in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        if hooks is not None:
            hooks.remove()
    return ce_sums, counts, preds


def held_back_metrics(bb: LoadedBackbone, unit_tasks: Sequence[list[Task]], seen: dict[str, Task],
                      adapters: dict, scale: float, settings: PromptSettings, *, max_new_tokens: int,
                      batch_size: int) -> list[dict]:
    """Per unit: held-back loss, ROUGE-L and EM of the teacher and of the zero-shot backbone."""
    from ..eval.metrics import compute_metrics

    examples: list[EncodedPair] = []
    refs: list[list[str]] = []
    row_unit: list[int] = []
    for i, tasks in enumerate(unit_tasks):
        for t in tasks:
            if t.name in seen:
                examples += encode_examples(seen[t.name], bb.tokenizer, settings)
                refs += [list(inst.references) for inst in seen[t.name].instances]
                row_unit += [i] * len(seen[t.name].instances)
    if not examples:
        return [{"held_back": None} for _ in unit_tasks]
    rows = torch.tensor(row_unit, dtype=torch.long)
    runs = {name: evaluate_rows(bb, examples, rows, ad, scale, max_new_tokens=max_new_tokens, batch_size=batch_size)
            for name, ad in (("teacher", adapters), ("zero_shot", None))}
    out = []
    for i in range(len(unit_tasks)):
        idx = [j for j, u in enumerate(row_unit) if u == i]
        if not idx:
            out.append({"held_back": None})
            continue
        rec: dict[str, Any] = {"held_back_instances": len(idx)}
        for name, (ce, cnt, preds) in runs.items():
            m = compute_metrics([preds[j] for j in idx], [refs[j] for j in idx])
            rec[name] = {"loss": sum(ce[j] for j in idx) / max(1, sum(cnt[j] for j in idx)), **m,
                         "examples": [[preds[j], refs[j][0]] for j in idx[:3]]}
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ the stage
def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def _loss_summary(losses: list[float]) -> dict:
    return {"loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
            "losses_every10": losses[::10], "steps_done": len(losses)}


def train_units(cfg, ru: RunUnits, units: Sequence[str], bb: LoadedBackbone, paths: RunPaths, *,
                time_budget_s: Optional[float] = None, progress: bool = True, log=print) -> list[str]:
    """Train and publish `units` together (one batch), for at most `time_budget_s` seconds. Returns the folders."""
    from ..adapters.peft_io import write_peft_adapter
    from .logging import TrainLogger

    settings = prompt_settings(cfg, bb.arch)
    manifests = [teacher_manifest(cfg, u, ru.tasks[u], bb) for u in units]
    specs_units = [UnitSpec(u, [e for t in ru.tasks[u] for e in encode_examples(t, bb.tokenizer, settings)],
                            m["seed"]) for u, m in zip(units, manifests)]
    tc = cfg.teacher
    trainer = BatchedTeacherTrainer(bb.model, bb.arch, bb.specs, specs_units, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                    dropout=cfg.lora.dropout, lr=tc.lr, steps=tc.steps, batch_size=tc.batch_size,
                                    warmup_steps=tc.warmup_steps, grad_clip=tc.grad_clip, pad_id=pad_id(bb.tokenizer),
                                    device=bb.device)
    ckpt = paths.teacher_ckpt(list(units))
    tag = {"units": list(units), "hashes": [m["hash"] for m in manifests]}
    if tc.resume == "never":
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        trainer.try_resume(ckpt, tag, log=log)
    logger = TrainLogger(paths.tb("teacher"), total_steps=tc.steps, enabled=True, initial_step=trainer.step_count,
                         show_progress=progress, desc=f"teacher x{len(units)}")

    def on_step(step: int, vals: list[float]) -> None:
        logger.advance()
        if step % 10 == 0 or step == tc.steps:
            logger.log_scalars(step, {f"teacher/{u}/loss": v for u, v in zip(units, vals)})

    try:
        res = trainer.train(ckpt_dir=ckpt, tag=tag, checkpoint_every=tc.checkpoint_every,
                            time_budget_s=time_budget_s, on_step=on_step)
    finally:
        logger.close()
        trainer.close()  # detach the training hooks even when interrupted
    if res.stopped_by_budget:
        log(f"teacher: time budget {tc.time_budget_s}s reached at step {res.steps}/{tc.steps}; publishing as is")
    adapters = {mt: (a.detach(), b.detach()) for mt, (a, b) in trainer.lora.adapters().items()}
    evals = held_back_metrics(bb, [ru.tasks[u] for u in units], ru.seen, adapters, trainer.scale, settings,
                              max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    task_type = "SEQ_2_SEQ_LM" if bb.arch == "t5" else "CAUSAL_LM"
    out = []
    for i, (u, m) in enumerate(zip(units, manifests)):
        metrics = {"unit": u, "tasks": m["data"]["tasks"], "train_instances": m["data"]["instances"],
                   **_loss_summary(res.losses[i]), "train_seconds": round(res.seconds, 2),
                   "stopped_by_budget": res.stopped_by_budget, "batched_with": len(units), **evals[i]}
        path = write_peft_adapter(paths.teacher(u), bb.specs, trainer.lora.unit(i), r=cfg.lora.r,
                                  alpha=cfg.lora.alpha, base_model=bb.path, task_type=task_type,
                                  extra_files={"metrics.json": metrics, "manifest.json": m})
        log(_summary_line(u, metrics))
        out.append(str(path))
    shutil.rmtree(ckpt, ignore_errors=True)  # published: the checkpoint has done its job
    with contextlib.suppress(OSError):
        paths.teacher_ckpt_root.rmdir()  # only when no other batch has a checkpoint in progress
    return out


def _summary_line(unit: str, m: dict) -> str:
    line = f"teacher {unit}: {m['steps_done']} steps"
    if m["steps_done"]:
        line += f", train loss {m['loss_first10']:.3f} -> {m['loss_last10']:.3f}"
    if m.get("teacher"):
        t, z = m["teacher"], m["zero_shot"]
        line += (f"; held-back loss {t['loss']:.3f} (zero-shot {z['loss']:.3f}), ROUGE-L {t['rougeL']:.1f} "
                 f"(zero-shot {z['rougeL']:.1f}), EM {t['exact_match']:.1f} (zero-shot {z['exact_match']:.1f})")
    return line


def run(cfg, task: Optional[str] = None, array_index: Optional[str] = None, progress: bool = True,
        log=print) -> dict[str, list[str]]:
    """Train the selected units that are not published yet. Returns {"trained": [...], "skipped": [...]}."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = RunPaths.of(cfg)
    ru = load_run_units(cfg)
    selected = ru.select(task, array_index)
    bb = load_run_backbone(cfg)
    todo, skipped = [], []
    for u in selected:  # refuse any mismatch before training anything
        m = teacher_manifest(cfg, u, ru.tasks[u], bb)
        if published_state(paths.teacher(u), m["hash"]) == "done":
            skipped.append(u)
            log(f"teacher {u}: skipped (published at {paths.teacher(u)}, manifest {m['hash'][:12]})")
        else:
            todo.append(u)
    k = max(1, cfg.teacher.tasks_per_batch)
    t0 = time.perf_counter()
    budget = cfg.teacher.time_budget_s
    for s in range(0, len(todo), k):
        torch.manual_seed(cfg.seed)  # LoRA dropout draws: the same on a fresh run and a rerun
        left = None if budget is None else max(0.0, budget - (time.perf_counter() - t0))  # one budget, all batches
        train_units(cfg, ru, todo[s:s + k], bb, paths, time_budget_s=left, progress=progress, log=log)
    return {"trained": todo, "skipped": skipped}


def list_units(cfg, config_path: str) -> str:
    ru = load_run_units(cfg)
    lines = []
    for i, u in enumerate(ru.units):
        extra = "" if ru.group_by == "task" else f"\t({len(ru.tasks[u])} tasks)"
        lines.append(f"{i}\t{u}{extra}")
    n, c = len(ru.units), cfg.teacher.array_concurrency
    lines.append(f"# {n} {ru.group_by} units; submit from the repository root:")
    lines.append("mkdir -p logs && " + sbatch_line(TEACHERS_SBATCH, n, c, config_path))
    lines.append("# then, once every teacher is published:")
    lines.append("mkdir -p logs && " + sbatch_line(CACHE_SBATCH, n, c, config_path))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="print index -> unit lines and the sbatch submit line, train nothing")


def main(args: argparse.Namespace) -> int:
    extra = getattr(args, "extra", {}) or {}
    if getattr(args, "list", False):
        print(list_units(args.cfg, args.config))
        return 0
    run(args.cfg, task=extra.get("task"), array_index=extra.get("array_index"))
    return 0
