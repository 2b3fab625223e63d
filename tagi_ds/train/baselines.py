"""Stage `baselines`: the multitask LoRA baselines every TAGI table compares against, trained on all training tasks
on the same engine as the hypernetwork (engine_stage.py): bf16, activation checkpointing, ZeRO and several ranks,
checkpoints, resume (also on another world size), SIGTERM.

    tagi-ds baselines --config X.yaml                     # every baseline of eval.methods
    tagi-ds baselines --config X.yaml mode=tk_instruct    # one of them
    torchrun --nproc_per_node 8 -m tagi_ds.cli baselines --config X.yaml mode=tk_instruct

- tk_instruct: a LoRA on the frozen backbone reading the full Tk-Instruct prompt (definition + demonstrations + input);
- no_instruction: the same LoRA reading the instance part alone.
The data is the hypernetwork's: its task-grouped sampler (k tasks x m instances per micro batch, every instance once
an epoch), prompts encoded exactly as the teachers' and the frozen backbone's (run/prompts.py: one encoder, one
truncation rule), loss on the answer tokens only (+ eos), token-weighted over the global batch. A tokenizer without
a pad token (Llama-2) pads with eos (data.collate.pad_id): padded positions are masked.

Output `<run_dir>/baselines/<mode>/`: the PEFT adapter (adapter_config.json written last: its presence means the
adapter is complete; base = the backbone's absolute path), train.json (steps, logged losses), stage.json (the
identity; another configuration is refused), checkpoints/, metrics.jsonl, summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..data.collate import EncodedPair, PromptSettings, assemble, pad_id
from ..data.registry import load_run_tasks_from_config
from ..data.sampler import EpochPositions, TaskGroupedSampler
from ..data.tasks import Task
from ..errors import ConfigError
from ..io_utils import atomic_write_json
from ..modeling.backbone import enable_hf_checkpointing
from ..modeling.label_logits import label_positions
from ..run.dist import collective_guard, rank
from ..run.identity import check_stage_record, config_identity, stage_record_hash, task_data
from ..run.methods import BASELINES, baseline_modes
from ..run.paths import RunPaths
from ..run.peft_io import ADAPTER_CONFIG
from ..run.prompts import encode_examples, prompt_settings
from ..run.stage_lock import stage_locked
from .engine_stage import METRICS_FILE, EngineSetup, StageSpec, setup_backbone, train_stage
from .losses import ce_sum

STAGE = "baselines"
EXTRA_KEYS = ("mode",)
TRAIN_RECORD = "train.json"


def identity(cfg, sub: Optional[str] = None) -> dict:
    """One baseline (`sub` = its mode): the task data, the backbone, the LoRA shape and the baselines section."""
    return {"mode": sub, **task_data(config_identity(cfg, ("seed", "data", "backbone", "lora", "baselines")))}


def baseline_examples(task: Task, tokenizer, settings: PromptSettings, mode: str) -> list[EncodedPair]:
    """A baseline's training pairs: the teachers' and the frozen backbone's own prompt encoding (run/prompts.py),
    the full Tk-Instruct source for tk_instruct, the instance part alone for no_instruction."""
    if mode not in BASELINES:
        raise ConfigError(f"baselines: unknown mode {mode!r}; expected one of {list(BASELINES)}")
    return encode_examples(task, tokenizer, settings, with_instruction=mode == "tk_instruct")


@dataclass
class BaselineBatch:
    input_ids: torch.Tensor  # (N, L) T5: prompt; causal: prompt + target
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, Ly) T5 / (N, L) causal, -100 outside the target

    def to(self, device) -> "BaselineBatch":
        return BaselineBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


class BaselineBatches:
    """The hypernetwork's task-grouped micro batches by global position, encoded when a batch is built (nothing is
    held but the current batch)."""

    def __init__(self, tasks: list[Task], tokenizer, settings: PromptSettings, mode: str, *, tasks_per_batch: int,
                 instances_per_task: int, seed: int):
        self.tasks, self.tokenizer, self.settings, self.mode = tasks, tokenizer, settings, mode
        self.positions = EpochPositions(TaskGroupedSampler([len(t.instances) for t in tasks], tasks_per_batch,
                                                           instances_per_task, seed=seed))
        self.pad = pad_id(tokenizer)

    def batch(self, position: int) -> BaselineBatch:
        pairs = []
        for t, i in self.positions.keys(position):
            task = self.tasks[t]
            pairs += baseline_examples(task.with_instances([task.instances[i]]), self.tokenizer, self.settings,
                                       self.mode)
        return BaselineBatch(**assemble(pairs, self.settings.arch, self.pad))


def causal_label_logits(model: nn.Module, batch: BaselineBatch
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal PEFT model's logits at the answer positions only: (logits (N, Lt, V), targets (N, Lt), mask (N, Lt)),
    equal to `label_positions` over the full logits.

    The decoder's final states (N, L, H) are picked at the positions that predict an answer token and only those go
    through the LM head. Why: the full logits (N, L, V) were the stage's largest structure three times over (the
    forward's logits, which `gather` saves for its backward; the gather's (N, L-1, V) zero-filled gradient and its
    scatter_add result; the slice's (N, L, V) gradient), while the loss reads Lt (~128) of L (~1,150) positions:
    measured on the LLaMA-depth scale_sim run, a 2.87 GiB peak against 1.35 GiB planned. The states are picked by
    `index_select` on the flattened (N*L, H): it saves only the index, and its backward is one (N*L, H) index_add.
    LoRA layers are injected in place, so calling the base model's decoder runs them; HF activation checkpointing
    lives on the decoder layers."""
    lm = model.get_base_model()  # the transformers CausalLM (PEFT's LoRA layers inside)
    hidden = lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state  # (N, L, H), after the final norm
    n, length, width = hidden.shape
    # label_positions over a (N, L, 1) "logits" of position numbers: which position predicts each answer token
    where = torch.arange(length, device=hidden.device).expand(n, length)[..., None]  # (N, L, 1)
    pos, targets, mask = label_positions(where, batch.labels, "llama")  # (N, Lt, 1), (N, Lt), (N, Lt)
    rows = torch.arange(n, device=hidden.device)[:, None] * length  # (N, 1)
    flat = (rows + pos[..., 0]).flatten()  # (N*Lt,) into the flattened (N*L) positions
    states = hidden.flatten(0, 1).index_select(0, flat).view(n, -1, width)  # (N, Lt, H)
    return lm.get_output_embeddings()(states), targets, mask  # (N, Lt, V)


class LoraStep(nn.Module):
    """What the engine wraps for a baseline: the PEFT model (trainable LoRA, frozen backbone) and its answer CE."""

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        self.model, self.arch = model, arch

    def forward(self, batch: BaselineBatch):
        if self.arch == "t5":  # the decoder runs over the answer alone: its logits are the label positions already
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                labels=batch.labels, use_cache=False).logits
            lg, targets, mask = label_positions(logits, batch.labels, self.arch)
        else:
            lg, targets, mask = causal_label_logits(self.model, batch)
        ce, n = ce_sum(lg, targets, mask)
        return ce, n, {"ce": ce.detach()}


def lora_model(setup: EngineSetup, cfg) -> nn.Module:
    """The backbone with a fresh, seeded PEFT LoRA on the run's target modules, in the backbone's dtype (the engine
    must not mix dtypes), with HF activation checkpointing when asked."""
    from peft import LoraConfig, get_peft_model

    from ..modeling.backbone import target_specs

    torch.manual_seed(cfg.seed)
    targets = sorted({s.name.rsplit(".", 1)[-1] for s in target_specs(setup.backbone.config,
                                                                       cfg.backbone.target_modules)})
    model = get_peft_model(setup.backbone, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                      target_modules=targets, lora_dropout=cfg.lora.dropout,
                                                      bias="none"))
    dtype = next(setup.backbone.parameters()).dtype
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    if cfg.backbone.gradient_checkpointing:
        enable_hf_checkpointing(model.base_model.model)
    return model


def _publish_adapter(module: LoraStep, out: Path, backbone_path: str, train_record: dict) -> Optional[Path]:
    """Collective under ZeRO-3 (the LoRA weights are gathered); rank 0 writes the adapter files into `out`, each by
    an atomic rename, adapter_config.json last (its presence = a complete adapter)."""
    import contextlib

    params = [p for p in module.parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with collective_guard("baseline export gather"), gathered:
        if rank() != 0:
            return None
        with tempfile.TemporaryDirectory(dir=out, prefix=".adapter-") as tmp:
            module.model.save_pretrained(tmp)
            acfg = json.loads((Path(tmp) / ADAPTER_CONFIG).read_text())
            acfg["base_model_name_or_path"] = str(Path(backbone_path).resolve())
            (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(acfg, indent=2))
            names = sorted(os.listdir(tmp), key=lambda n: n == ADAPTER_CONFIG)  # the config last
            for name in names:
                os.replace(Path(tmp) / name, out / name)
    atomic_write_json(out / TRAIN_RECORD, train_record)
    return out


def _logged_losses(out: Path) -> list[float]:
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def train_baseline(cfg, mode: str, record: Optional[dict], *, progress: bool = True) -> Optional[Path]:
    b, paths = cfg.baselines, RunPaths.of(cfg)
    out = paths.baseline(mode)
    setup = setup_backbone(cfg, micro_batch=b.tasks_per_batch * b.instances_per_task, loop=b)
    tasks = load_run_tasks_from_config(cfg)["train"]
    batches = BaselineBatches(tasks, setup.tokenizer, prompt_settings(cfg, setup.arch), mode,
                              tasks_per_batch=b.tasks_per_batch, instances_per_task=b.instances_per_task, seed=cfg.seed)
    module = LoraStep(lora_model(setup, cfg), setup.arch)

    def export(m: nn.Module, step: int) -> Optional[Path]:
        losses = _logged_losses(out)
        return _publish_adapter(m, out, setup.backbone_path, {
            "mode": mode, "steps": step, "log_every": b.log_every, "losses": losses, "num_tasks": len(tasks),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "lora": [cfg.lora.r, cfg.lora.alpha], "backbone": setup.backbone_path})

    spec = StageSpec(f"{STAGE} ({mode})", out, paths.tb(f"baseline_{mode}"), b, record, batches, module, export,
                     variant=mode, summary={"mode": mode, "tasks": len(tasks)})
    return train_stage(setup, spec, show_progress=progress)


@stage_locked("baselines")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """Train the baselines of eval.methods (or mode `sub` alone) that are not trained yet; returns their folders."""
    modes = [sub] if sub is not None else baseline_modes(cfg)
    bad = [m for m in modes if m not in BASELINES]
    if bad:
        raise ConfigError(f"baselines: unknown mode {bad[0]!r}; expected one of {list(BASELINES)}")
    paths = RunPaths.of(cfg)
    out = []
    for m in modes:
        folder = paths.baseline(m)
        record = check_stage_record(folder, f"{STAGE} ({m})", identity(cfg, m))
        if record is None and (folder / ADAPTER_CONFIG).is_file():
            log(f"baseline {m}: skipped (trained at {folder}, hash {stage_record_hash(folder)[:12]})")
        else:
            train_baseline(cfg, m, record, progress=progress)
            losses = _logged_losses(folder)
            if losses:
                log(f"baseline {m}: loss {losses[0]:.3f} -> {losses[-1]:.3f} (logged every {cfg.baselines.log_every})")
        out.append(folder)
    return out


def main(args: argparse.Namespace) -> int:
    run(args.cfg, (getattr(args, "extra", None) or {}).get("mode"))
    return 0
