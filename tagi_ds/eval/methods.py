"""Every evaluated method as one function: (config, tasks of one split) → one greedy prediction per instance.

Methods and how they run at test time (the same backbone, tokenizer, prompts and decoding for all):
- no_ft: the frozen backbone reads the full Tk-Instruct prompt (definition + positive examples + input).
- no_instruction / tk_instruct: the multitask LoRA baselines (train/multitask.py) on the instance part alone / on
  the full prompt; trained here when missing (`ensure_baseline`), LoRA merged for inference.
- teacher: each seen task's own LoRA teacher on the full prompt (all teachers batched through the LoRA hooks);
  it has no number on unseen tasks (no teacher exists for them).
- hint, tagi and the ablations: a hypernetwork export (finetune/<variant>/export). The instruction is encoded ONCE
  per task and the adapters of all the split's tasks are generated in one hypernetwork call; the instances of all
  tasks are then decoded together, each row with its task's LoRA (batched hooks) and instruction prefix (fusion).

Finetune variants are the finetune stage with overrides (`VARIANT_OVERRIDES`); the pipeline trains them, the
evaluation reads their exports.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..data.collate import (PromptSettings, decode_generated, encode_prompt, full_prompt_text, instruction_ids,
                            pad_id, pad_rows)
from ..data.prompts import build_task_input
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..io_utils import atomic_write_json, sha256_json

BASELINES = ("no_instruction", "tk_instruct")
HYPERNET_METHODS = ("hint", "tagi", "tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain", "tagi_no_fusion")
ALL_METHODS = ("no_ft",) + BASELINES + ("teacher",) + HYPERNET_METHODS
# A finetune variant = the finetune stage with these dotted overrides (its export lives in finetune/<variant>).
VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "tagi": {},
    "hint": {"finetune.lambda_kl": 0.0, "finetune.lambda_ins": 0.0},  # CE only, from the pretrain export
    "tagi_no_kl": {"finetune.lambda_kl": 0.0},
    "tagi_no_ins": {"finetune.lambda_ins": 0.0},
    "tagi_no_pretrain": {"finetune.init_from_pretrain": False},
    "tagi_no_fusion": {"hypernet.fusion": False},
}
BASELINE_MARKER = "baseline.json"


def check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ConfigError(f"eval.methods: unknown method(s) {bad}; expected some of {list(ALL_METHODS)}")
    return list(methods)


def set_dotted(cfg: Any, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node = cfg
    for p in path:
        node = getattr(node, p)
    if not hasattr(node, leaf):
        raise ConfigError(f"override {dotted!r}: no such config key")
    setattr(node, leaf, value)


def variant_config(cfg: Any, variant: str) -> Any:
    """A copy of `cfg` with the finetune variant's overrides applied."""
    if variant not in VARIANT_OVERRIDES:
        raise ConfigError(f"finetune variant {variant!r}: expected one of {list(VARIANT_OVERRIDES)}")
    out = copy.deepcopy(cfg)
    for key, value in VARIANT_OVERRIDES[variant].items():
        set_dotted(out, key, value)
    return out


def export_dir(cfg: Any, method: str) -> Path:
    from ..train.export import EXPORT_SUBDIR

    return Path(cfg.run_dir) / "finetune" / method / EXPORT_SUBDIR


def baseline_dir(cfg: Any, mode: str) -> Path:
    return Path(cfg.run_dir) / "baselines" / mode


# ------------------------------------------------------------------------------------------------ results
@dataclass
class MethodPredictions:
    """Predictions per split (None: the method has no number there) and the seconds spent producing them
    (tokenization + instruction encoding / adapter generation + decoding; model loading excluded)."""

    by_split: dict[str, Optional[list[str]]]
    seconds: float
    instances: int


def _device(cfg: Any) -> torch.device:
    from ..train.teacher import resolve_device

    return resolve_device(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _eos_ids(tokenizer, model_config) -> list[int]:
    eos = getattr(model_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)])
    return ids or [int(tokenizer.eos_token_id)]


# ------------------------------------------------------------------------------------------------ full prompt
@torch.no_grad()
def generate_full_prompt(model, tokenizer, arch: str, prompts: Sequence[Sequence[int]], *, device, max_new_tokens: int,
                         batch_size: int, hooks=None, adapters=None, row_unit: Optional[Sequence[int]] = None
                         ) -> list[str]:
    """Greedy answers of the plain backbone (or with per-row LoRA through `hooks`) to tokenized prompts.
    Rows are decoded in length-sorted batches (less padding), answers returned in input order."""
    import contextlib

    pad = pad_id(tokenizer)
    eos = _eos_ids(tokenizer, model.config)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    left = arch == "llama"
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [list(prompts[i]) for i in idx]
        ids = pad_rows(rows, pad, left).to(device)
        mask = pad_rows([[1] * len(r) for r in rows], 0, left).to(device)
        ctx = contextlib.nullcontext()
        if hooks is not None:
            ctx = hooks.apply(adapters, torch.tensor([row_unit[i] for i in idx], dtype=torch.long, device=device))
        with ctx:
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad, eos_token_id=eos)
        new = gen if arch == "t5" else gen[:, ids.shape[1]:]
        for i, text in zip(idx, decode_generated(tokenizer, new.cpu(), eos)):
            out[i] = text
    return out


def _settings(cfg: Any, arch: str) -> PromptSettings:
    from ..train.teacher import prompt_settings

    return prompt_settings(cfg, arch)


def _full_prompts(tasks: Sequence[Task], tokenizer, settings: PromptSettings) -> list[list[int]]:
    """The teacher's exact prompt encoding (teacher.encode_examples / collate.collate_full)."""
    return [encode_prompt(tokenizer, full_prompt_text(t, i, tokenizer, settings), settings.max_source_length)
            for t in tasks for i in t.instances]


def predict_no_ft(cfg: Any, splits: dict[str, list[Task]], bb) -> MethodPredictions:
    settings = _settings(cfg, bb.arch)
    model = bb.model
    out, secs, n = {}, 0.0, 0
    for split, tasks in splits.items():
        t0 = time.perf_counter()
        prompts = _full_prompts(tasks, bb.tokenizer, settings)
        out[split] = generate_full_prompt(model, bb.tokenizer, bb.arch, prompts, device=bb.device,
                                          max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        _sync(bb.device)
        secs += time.perf_counter() - t0
        n += len(prompts)
    return MethodPredictions(out, secs, n)


def predict_teacher(cfg: Any, splits: dict[str, list[Task]], bb) -> MethodPredictions:
    """Seen split only: every task's teacher (task or category unit), all units batched in the hooks."""
    from ..adapters.peft_io import read_peft_adapter
    from ..modeling.lora import BatchedLoraHooks
    from ..train.finetune import teacher_unit
    from ..train.run_paths import RunPaths

    paths = RunPaths.of(cfg)
    out: dict[str, Optional[list[str]]] = {s: None for s in splits}
    tasks = splits.get("seen") or []
    units = sorted({teacher_unit(t, cfg.teacher.group_by) for t in tasks})
    missing = [u for u in units if not (paths.teacher(u) / "adapter_config.json").is_file()]
    if not tasks or missing:
        if missing:
            print(f"evaluate: teacher: no published teacher for {len(missing)} unit(s) (e.g. {missing[0]}); "
                  f"no teacher numbers")
        return MethodPredictions(out, 0.0, 0)
    loaded = [read_peft_adapter(paths.teacher(u), bb.specs, device=bb.device) for u in units]
    scales = {round(s, 8) for _, s, _ in loaded}
    if len(scales) != 1:
        raise ArtifactMismatchError(f"{paths.teachers}: teachers have different LoRA scales {sorted(scales)}")
    adapters = {mt: (torch.stack([a[mt][0] for a, _, _ in loaded]), torch.stack([a[mt][1] for a, _, _ in loaded]))
                for mt in loaded[0][0]}
    hooks = BatchedLoraHooks(bb.model, bb.specs, loaded[0][1])
    try:
        settings = _settings(cfg, bb.arch)
        unit_pos = {u: i for i, u in enumerate(units)}
        t0 = time.perf_counter()
        prompts = _full_prompts(tasks, bb.tokenizer, settings)
        row_unit = [unit_pos[teacher_unit(t, cfg.teacher.group_by)] for t in tasks for _ in t.instances]
        out["seen"] = generate_full_prompt(bb.model, bb.tokenizer, bb.arch, prompts, device=bb.device,
                                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                           hooks=hooks, adapters=adapters, row_unit=row_unit)
        _sync(bb.device)
        secs = time.perf_counter() - t0
    finally:
        hooks.remove()
    return MethodPredictions(out, secs, len(prompts))


# ------------------------------------------------------------------------------------------------ baselines
def baseline_budget(cfg: Any) -> Optional[float]:
    """Seconds per baseline: the pipeline's stage_budgets_s["baselines"] when given (the same number whether the
    pipeline or `tagi-ds evaluate` trains it), else eval.baseline_time_budget_s."""
    b = cfg.stage_budgets_s.get("baselines")
    return float(b) if b is not None else cfg.eval.baseline_time_budget_s


def baseline_spec(cfg: Any, mode: str, backbone_id: str) -> dict:
    """What decides a multitask baseline's weights; its hash marks the trained folder."""
    d = cfg.data
    body = {"mode": mode, "backbone_id": backbone_id, "seed": cfg.seed, "data": _plain(d),
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": list(cfg.backbone.target_modules)},
            "steps": cfg.eval.baseline_steps, "lr": cfg.eval.baseline_lr,
            "time_budget_s": baseline_budget(cfg), "batch": cfg.eval.baseline_batch_size}
    return {**body, "hash": sha256_json(body)}


def _plain(section: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(section)


def ensure_baseline(cfg: Any, mode: str, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Train the `mode` baseline unless its folder holds this config's hash; returns the folder."""
    from ..data.registry import load_run_tasks_from_config
    from ..data.synthetic import task_weights
    from ..train.multitask import train_multitask
    from ..train.teacher import backbone_identity, load_run_backbone

    bb = load_run_backbone(cfg)
    spec = baseline_spec(cfg, mode, backbone_identity(bb.path))
    out = baseline_dir(cfg, mode)
    marker = out / BASELINE_MARKER
    if out.exists():
        try:
            have = json.loads(marker.read_text()).get("hash")
        except (OSError, ValueError, AttributeError):
            have = None
        if have == spec["hash"]:
            log(f"baseline {mode}: skipped (trained at {out}, hash {have[:12]})")
            return out
        raise ArtifactMismatchError(f"{out}: an existing {mode} baseline was trained for another configuration "
                                    f"(hash {have!r} in {marker}; this run expects {spec['hash']!r}); remove that "
                                    f"folder to retrain it (or rerun the pipeline with --from baselines)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train = load_run_tasks_from_config(cfg)["train"]
    weights = task_weights(train, 0.6) if cfg.data.source == "synthetic" else None
    leaf = sorted({s.name.rsplit(".", 1)[-1] for s in bb.specs})  # PEFT target names of the run's LoRA kinds
    t0 = time.perf_counter()
    train_multitask(bb.path, train, out, mode=mode, steps=cfg.eval.baseline_steps, lr=cfg.eval.baseline_lr,
                    batch=cfg.eval.baseline_batch_size, time_budget_s=baseline_budget(cfg),
                    seed=cfg.seed, lora=(cfg.lora.r, cfg.lora.alpha, tuple(leaf)), task_weights=weights,
                    num_pos=cfg.data.num_pos_examples, max_len=cfg.data.max_source_length,
                    device=str(bb.device), tb_dir=Path(cfg.run_dir) / "tb" / f"baseline_{mode}", progress=progress)
    atomic_write_json(marker, spec)
    stats = json.loads((out / "train.json").read_text())
    log(f"baseline {mode}: {stats['steps']} steps in {time.perf_counter() - t0:.0f} s, loss "
        f"{stats['loss_first10']:.3f} -> {stats['loss_last10']:.3f}")
    return out


def predict_baseline(cfg: Any, mode: str, splits: dict[str, list[Task]], bb, train_if_missing: bool = True
                     ) -> MethodPredictions:
    from ..train.multitask import generate_greedy, load_model_and_tokenizer, prompt_for

    folder = baseline_dir(cfg, mode)
    if train_if_missing:
        folder = ensure_baseline(cfg, mode)
    model, tok = load_model_and_tokenizer(folder, str(bb.device))
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # no per-token LoRA cost
    max_len = cfg.data.max_source_length if mode == "tk_instruct" else cfg.data.max_input_length
    out, secs, n = {}, 0.0, 0
    for split, tasks in splits.items():
        t0 = time.perf_counter()
        prompts = [prompt_for(t, i, mode, cfg.data.num_pos_examples) for t in tasks for i in t.instances]
        out[split] = generate_greedy(model, tok, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                     batch_size=cfg.eval.batch_size, max_len=max_len, device=str(bb.device))
        _sync(bb.device)
        secs += time.perf_counter() - t0
        n += len(prompts)
    return MethodPredictions(out, secs, n)


# ------------------------------------------------------------------------------------------------ hypernetwork
def load_student(cfg: Any, method: str, bb):
    """The TAGI student of a finetune variant's export, on a fresh copy of the backbone (its own hooks)."""
    from ..modeling.backbone import load_backbone
    from ..train.export import load_student_from_export

    src = export_dir(cfg, method)
    backbone, _ = load_backbone(bb.path, bb.arch, cfg.backbone.dtype, cfg.backbone.attn_implementation)
    return load_student_from_export(src, backbone=backbone, device=bb.device, backend=cfg.hypernet.kernel)


@torch.no_grad()
def student_predict(student, tokenizer, tasks: Sequence[Task], settings: PromptSettings, *, device,
                    max_new_tokens: int, batch_size: int) -> list[str]:
    """All instances of `tasks`: instructions encoded once per task, adapters generated once for all tasks, then
    batched greedy decoding across tasks (each row its task's LoRA and instruction prefix)."""
    from ..train.hypernet_trainer import precompute_encodings

    pad = pad_id(tokenizer)
    rows = [instruction_ids(t, tokenizer, settings) for t in tasks]
    encoding = precompute_encodings(student, rows, pad, device).to(device)  # (n_tasks, ...) once per task
    adapters = student.generate_adapters(encoding)  # one hypernetwork call for every task of the split
    eos = _eos_ids(tokenizer, student.backbone.config)
    items = [(ti, encode_prompt(tokenizer, build_task_input(inst), settings.max_input_length))
             for ti, t in enumerate(tasks) for inst in t.instances]
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    out = [""] * len(items)
    left = student.arch == "llama"
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids = pad_rows([items[i][1] for i in idx], pad, left).to(device)
        mask = pad_rows([[1] * len(items[i][1]) for i in idx], 0, left).to(device)
        task_ids = torch.tensor([items[i][0] for i in idx], dtype=torch.long, device=device)
        tokens = student.generate(encoding, task_ids, ids, mask, max_new_tokens, adapters=adapters)
        for i, text in zip(idx, decode_generated(tokenizer, tokens.cpu(), eos)):
            out[i] = text
    return out


def predict_hypernet(cfg: Any, method: str, splits: dict[str, list[Task]], bb) -> MethodPredictions:
    if not (export_dir(cfg, method) / "config.json").is_file():
        print(f"evaluate: {method}: no export at {export_dir(cfg, method)} (run the pipeline's finetune stage); "
              f"no numbers")
        return MethodPredictions({s: None for s in splits}, 0.0, 0)
    student = load_student(cfg, method, bb)
    settings = _settings(cfg, bb.arch)
    out, secs, n = {}, 0.0, 0
    for split, tasks in splits.items():
        t0 = time.perf_counter()
        out[split] = student_predict(student, bb.tokenizer, tasks, settings, device=bb.device,
                                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        _sync(bb.device)
        secs += time.perf_counter() - t0
        n += sum(len(t.instances) for t in tasks)
    return MethodPredictions(out, secs, n)


def predict_method(cfg: Any, method: str, splits: dict[str, list[Task]], bb) -> MethodPredictions:
    if method == "no_ft":
        return predict_no_ft(cfg, splits, bb)
    if method in BASELINES:
        return predict_baseline(cfg, method, splits, bb)
    if method == "teacher":
        return predict_teacher(cfg, splits, bb)
    if method in HYPERNET_METHODS:
        return predict_hypernet(cfg, method, splits, bb)
    raise ConfigError(f"eval.methods: unknown method {method!r}; expected some of {list(ALL_METHODS)}")

