"""The loop both hypernetwork stages share: setup / train / save / cleanup (torchtune-style recipe class).

    trainer = PretrainTrainer(cfg)            # or FinetuneTrainer(cfg, variant="tagi")
    trainer.setup()                            # distributed, backbone (ZeRO-3 partitioned), student, data, engine,
                                               # ALL instruction encodings in one collective pass, resume
    trainer.train()                            # token-weighted global loss, logs, checkpoints every N steps
    trainer.save()                             # final checkpoint + inference export of the hypernetwork alone
    trainer.cleanup()

A stage subclass gives the data (`build_data`: one instruction per "task", a task-grouped sampler), the batches
(`make_batch`) and the loss (`loss_terms`: summed token losses, the token count, and each term's sum). The loss step
runs inside the engine's forward (`_StepModule`), so DeepSpeed sees one module call per micro batch.

Why precompute the instructions: under ZeRO-3 every rank must run the same sequence of backbone forwards; encoding
lazily per batch would make ranks differ (and repeat the work). Encodings live on CPU and are moved per batch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig, dump_yaml
from ..errors import ConfigError, TagiError
from ..io_utils import atomic_write_json, atomic_write_text
from ..modeling.tagi import TagiStudent, TaskEncoding, build_student
from .distributed import (all_reduce_mean, collective_guard, ds_config_from_file, global_token_mean,
                          init_distributed, rank, world_size, zero3_model_context)
from .engine import Engine, seed_everything
from .export import EXPORT_SUBDIR, export_config, export_hypernetwork

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
IGNORE = -100
MAX_NONFINITE_IN_A_ROW = 5  # skipped nan/inf batches in a row before the run stops with an error


@dataclass
class TrainBatch:
    """One micro batch of one rank. Tasks are the batch's own (n_tasks); `task_index` maps them to the stage's
    task list (rows of the precomputed encodings)."""

    task_index: torch.Tensor  # (n_tasks,) long
    task_ids: torch.Tensor  # (N,) long, row → batch task
    input_ids: torch.Tensor  # (N, Lx)
    attention_mask: torch.Tensor  # (N, Lx)
    labels: torch.Tensor  # (N, Ly) T5 / (N, Lx) causal, IGNORE outside the target
    instr_ids: torch.Tensor  # (n_tasks, Li): only read when the instruction encoder trains
    instr_mask: torch.Tensor  # (n_tasks, Li)
    task_names: list[str]
    instance_ids: list[str]
    extra: Any = None  # stage-specific (finetune: the full-prompt batch of the online teacher)

    def to(self, device) -> "TrainBatch":
        for fl in fields(self):
            v = getattr(self, fl.name)
            if isinstance(v, torch.Tensor):
                setattr(self, fl.name, v.to(device))
            elif hasattr(v, "to") and not isinstance(v, (str, list)):
                setattr(self, fl.name, v.to(device))
        return self


# ------------------------------------------------------------------------------------------- loss pieces
def label_positions(logits: torch.Tensor, labels: torch.Tensor, arch: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each label token, left-aligned per row: (logits (N, L, V), targets (N, L), mask (N, L)).

    T5: labels (N, Ly) are already target + eos right-padded with IGNORE. Causal: logits[t] predicts input[t+1];
    the target tokens of a row are contiguous (prompt, target, padding), so row i's label logits start one before
    its first label. Left alignment is what the teacher top-k (stored per label position) expects.
    """
    if arch == "t5":
        mask = labels != IGNORE
        return logits, labels.masked_fill(~mask, 0), mask
    shifted = labels[:, 1:]  # (N, Lx-1): the token each logits[:, :-1] position predicts
    valid = shifted != IGNORE
    lengths = valid.sum(dim=1)  # (N,)
    first = torch.where(lengths > 0, valid.float().argmax(dim=1), torch.zeros_like(lengths))  # (N,)
    L = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    offs = torch.arange(L, device=labels.device)[None, :]  # (1, L)
    mask = offs < lengths[:, None]  # (N, L)
    idx = (first[:, None] + offs).clamp_max(shifted.shape[1] - 1)  # (N, L)
    lab = shifted.gather(1, idx).masked_fill(~mask, 0)
    gathered = logits[:, :-1].gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))  # (N, L, V)
    return gathered, lab, mask


def student_logits(student: TagiStudent, encoding: TaskEncoding, batch: "TrainBatch",
                   adapters=None) -> torch.Tensor:
    """The student's logits for the batch (no loss inside: the stages sum token losses themselves)."""
    dec = student.backbone._shift_right(batch.labels) if student.arch == "t5" else None
    out = student(encoding, batch.task_ids, batch.input_ids, batch.attention_mask, labels=None,
                  decoder_input_ids=dec, adapters=adapters)
    return out.logits


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy in float32, token count) over mask. logits (N, L, V), targets/mask (N, L)."""
    tgt = targets.masked_fill(~mask, IGNORE)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, mask.sum()


@torch.no_grad()
def head_lr_scale_of(hcfg) -> Callable[[str], float]:
    """Per-parameter lr multiplier: `hypernet.head_lr_scale` (None = 1/sqrt(hidden)) on the heads' weight matrices,
    1 elsewhere (see the config field's help for why)."""
    scale = hcfg.head_lr_scale if hcfg.head_lr_scale is not None else hcfg.hidden ** -0.5
    return lambda name: scale if "head_weight" in name.split(".") else 1.0


def precompute_encodings(student: TagiStudent, rows: Sequence[Sequence[int]], pad_id: int,
                         device: torch.device | str, chunk: int = 16) -> TaskEncoding:
    """Encode every instruction once, in fixed chunks of one common width (every rank runs the same forwards:
    ZeRO-3 gathers stay in step). Returns a CPU TaskEncoding of len(rows) tasks."""
    if not rows:
        raise TagiError("no instructions to encode: the stage has no tasks")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    parts: list[TaskEncoding] = []
    for s in range(0, len(rows), chunk):
        enc = student.encode_instructions(ids[s:s + chunk].to(device), mask[s:s + chunk].to(device))
        parts.append(enc.to("cpu"))
    prefix = None
    if parts[0].prefix is not None:
        prefix = tuple((torch.cat([p.prefix[layer][0] for p in parts]), torch.cat([p.prefix[layer][1] for p in parts]))
                       for layer in range(len(parts[0].prefix)))
    return TaskEncoding(torch.cat([p.pooled for p in parts]), torch.cat([p.hidden for p in parts]),
                        torch.cat([p.mask for p in parts]), prefix)


class _StepModule(nn.Module):
    """What the engine wraps: the student (trainable hypernetwork, frozen backbone) and the stage's loss step."""

    def __init__(self, student: TagiStudent, loss_fn: Callable[[TagiStudent, TrainBatch], tuple]):
        super().__init__()
        self.student = student
        self._loss_fn = loss_fn

    def forward(self, batch: TrainBatch):
        return self._loss_fn(self.student, batch)


def resolve_ds_config(path: str) -> Path:
    """A relative ds config path is looked up in the working directory, then in the repository."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).is_file() else p


def partition_facts(backbone: nn.Module) -> dict[str, Any]:
    """ZeRO-3 state of the frozen backbone's parameters (rank-local; no collectives)."""
    params = list(backbone.named_parameters())
    if not params or not hasattr(params[0][1], "ds_numel"):
        return {"partitioned": False, "n_params": len(params)}
    w = world_size()
    name, big = max(params, key=lambda kv: kv[1].ds_numel)
    return {"partitioned": all(p.numel() == 0 for _, p in params), "n_params": len(params),
            "shards_ok": all(p.ds_tensor.numel() == math.ceil(p.ds_numel / w) for _, p in params),
            "example": {"name": name, "ds_numel": int(big.ds_numel), "numel": int(big.numel()),
                        "shard": int(big.ds_tensor.numel()), "status": str(big.ds_status)}}


# ------------------------------------------------------------------------------------------ stage identity
STAGE_MANIFEST = "stage.json"
# Keys that change how a run executes or logs, never the weights it publishes: they may differ between a run and
# its rerun / resume. Everything else in the stage's identity must match the folder's stage.json.
_RUNTIME_KEYS = {
    "": {"name", "runs_dir", "threads", "device", "eval", "distributed", "stage_budgets_s"},
    "train": {"enabled", "time_budget_s", "checkpoint_every", "keep_checkpoints", "resume", "log_every"},
    "teacher": {"time_budget_s", "checkpoint_every", "resume", "array_concurrency"},
    "cache": {"batch_size"},
    "backbone": {"gradient_checkpointing", "attn_implementation"},
    "hypernet": {"kernel"},
    "data": {"max_eval_instances_per_task"},
}
_PRETRAIN_DATA = (
    "pretrain_text", "pretrain_segment_lengths", "pretrain_offline_docs", "pretrain_offline_corpus", "seed")


def stage_identity(cfg, stage: str) -> dict[str, Any]:
    """What a hypernetwork stage's published weights depend on: the resolved config of the sections it reads,
    minus runtime-only keys (`_RUNTIME_KEYS`). Pretrain does not read the teacher / cache / finetune sections or
    the task data; finetune reads the pretrain section only when it starts from the pretrain export."""
    from ..config import to_dict

    full = to_dict(cfg)
    drop = lambda d, kind: {k: v for k, v in d.items() if k not in _RUNTIME_KEYS[kind]}  # noqa: E731
    ident = {k: v for k, v in full.items() if k not in _RUNTIME_KEYS[""]}
    for sec in ("teacher", "cache", "backbone", "hypernet", "data"):
        ident[sec] = drop(ident[sec], sec)
    for sec in ("pretrain", "finetune"):
        ident[sec] = drop(ident[sec], "train")
    if stage == "pretrain":
        for sec in ("teacher", "cache", "finetune"):
            ident.pop(sec)
        ident["data"] = {k: ident["data"][k] for k in _PRETRAIN_DATA}
    elif not (cfg.finetune.init_from_pretrain and cfg.pretrain.enabled):
        ident.pop("pretrain")
    return ident


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def check_stage_identity(out_dir: Path, stage: str, identity: dict[str, Any]) -> Optional[dict]:
    """Refuse (ArtifactMismatchError naming both hashes and the differing keys) when `out_dir` holds a run of
    another configuration; return the record to write (None when the folder already holds this one)."""
    from ..errors import ArtifactMismatchError
    from ..io_utils import sha256_json

    want = sha256_json(identity)
    path = out_dir / STAGE_MANIFEST
    if not path.is_file():
        return {"stage": stage, "hash": want, "identity": identity}
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
        have_hash, have_ident = have["hash"], have["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactMismatchError(f"{path}: unreadable stage record ({e}); remove {out_dir} to start over") from None
    if have_hash == want:
        return None
    a, b = _flat(have_ident), _flat(identity)
    diff = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]
    raise ArtifactMismatchError(
        f"{out_dir}: holds a {stage} run of another configuration (hash {have_hash[:16]} in {path}; this run is "
        f"{want[:16]}); differing keys: {'; '.join(diff[:6])}{' …' if len(diff) > 6 else ''}. Its checkpoints and "
        f"export are kept: use another run name (or finetune variant=NAME), or remove that folder to retrain")


# ------------------------------------------------------------------------------------------------ trainer
class HypernetTrainer:
    """Shared setup / train / save / cleanup of the two hypernetwork stages (subclasses: data and loss)."""

    stage = "stage"

    def __init__(self, cfg, train: TrainConfig, out_dir: Path, tb_dir: Path, *, variant: Optional[str] = None,
                 on_checkpoint: Optional[Callable[[int], None]] = None, show_progress: bool = True):
        self.cfg, self.train_cfg = cfg, train
        self.out_dir, self.tb_dir = Path(out_dir), Path(tb_dir)
        self.variant = variant
        self.on_checkpoint = on_checkpoint
        self.show_progress = show_progress
        self.engine: Optional[Engine] = None
        self.encodings: Optional[TaskEncoding] = None
        self.summary: dict[str, Any] = {"stage": self.stage, "variant": variant}
        self._epoch_batches: tuple[int, list] = (-1, [])

    # -------------------------------------------------------------------------------- subclass hooks
    def build_data(self) -> tuple[list[list[int]], Any]:
        """(instruction token rows, one per task; a TaskGroupedSampler over the tasks' instances)."""
        raise NotImplementedError

    def make_batch(self, keys: list[tuple[int, int]]) -> TrainBatch:
        raise NotImplementedError

    def loss_terms(self, student: TagiStudent, batch: TrainBatch
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted sum of token losses, token count, {term: detached sum}) for this rank's micro batch."""
        raise NotImplementedError

    def init_weights(self, student: TagiStudent) -> None:
        """Before the engine wraps the student (finetune: start from the pretrain export)."""

    # ----------------------------------------------------------------------------------------- setup
    @property
    def use_deepspeed(self) -> bool:
        return bool(self.cfg.distributed.use_deepspeed)

    def _device(self) -> torch.device:
        import os

        want = self.cfg.device
        cuda_ok = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        if want == "cuda" and not cuda_ok:
            raise ConfigError("device: cuda was asked for but CUDA is not available (or DS_ACCELERATOR=cpu)")
        if want == "cpu" or not cuda_ok:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def micro_batch_size(self) -> int:
        return self.train_cfg.tasks_per_batch * self.train_cfg.instances_per_task

    def setup(self) -> None:
        cfg, t = self.cfg, self.train_cfg
        # Before anything is written or resumed: never mix with (or overwrite) a run of another configuration.
        stage_record = check_stage_identity(self.out_dir, self.stage, stage_identity(cfg, self.stage))
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        seed_everything(cfg.seed)
        ds = None
        if self.use_deepspeed:
            info = init_distributed(cfg.distributed.timeout_s)
            ds = ds_config_from_file(resolve_ds_config(cfg.distributed.ds_config), micro_batch=self.micro_batch_size(),
                                     grad_accum=t.grad_accum, lr=t.lr, weight_decay=t.weight_decay,
                                     grad_clip=t.grad_clip, dtype=cfg.backbone.dtype,
                                     zero_stage=cfg.distributed.zero_stage,
                                     param_persistence_threshold=cfg.distributed.param_persistence_threshold,
                                     world_size=info.world_size)
        self.ds_config = ds
        self.device = self._device()
        self.tokenizer, self.backbone_id = self._load_tokenizer()
        backbone, self.arch = self._load_backbone(ds)
        seed_everything(cfg.seed)  # the hypernetwork's init must not depend on what loading the backbone drew
        self.student = self._build_student(backbone)
        if cfg.backbone.gradient_checkpointing:  # ours, not HF's: the recompute keeps the LoRA terms and the prefix
            self.student.enable_activation_checkpointing()
        self.init_weights(self.student)
        rows, self.sampler = self.build_data()
        self.instruction_rows = rows
        self.module = _StepModule(self.student, self.loss_terms)
        if not self.use_deepspeed:
            self.module.to(self.device)
        self.engine = Engine(self.module, ds, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                             schedule=t.schedule, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                             use_deepspeed=self.use_deepspeed, out_dir=self.out_dir, seed=cfg.seed,
                             log_dir=self.tb_dir, grad_accum=t.grad_accum, keep_checkpoints=t.keep_checkpoints,
                             timeout_s=cfg.distributed.timeout_s, show_progress=self.show_progress,
                             lr_scale_of=head_lr_scale_of(cfg.hypernet))
        self.summary["backbone_partition"] = partition_facts(self.student.backbone)
        if not self.student.train_encoder:
            t0 = time.perf_counter()
            self.encodings = precompute_encodings(self.student, rows, self._pad_id(), self.device)
            self.summary["instruction_encoding"] = {"tasks": len(rows), "seconds": time.perf_counter() - t0}
        self.start_step = 0
        if t.resume == "auto":
            progress = self.engine.resume_latest()
            if progress is not None:
                self.start_step = int(progress["step"])
                self.summary["resumed_from"] = self.start_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if rank() == 0:
            if stage_record is not None:
                atomic_write_json(self.out_dir / STAGE_MANIFEST, stage_record)
            atomic_write_text(self.out_dir / "config.yaml", dump_yaml(cfg))

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        from .backbone_stage import resolve_backbone_path

        path = str(resolve_backbone_path(self.cfg))
        tok_path = self.cfg.backbone.tokenizer or path
        return AutoTokenizer.from_pretrained(tok_path), path

    def _load_backbone(self, ds: Optional[dict]):
        from ..modeling.backbone import load_backbone

        b = self.cfg.backbone
        if ds is not None:
            with zero3_model_context(ds):  # partitioned at construction under ZeRO-3 (a no-op otherwise)
                return load_backbone(self.backbone_id, b.arch, b.dtype, b.attn_implementation)
        return load_backbone(self.backbone_id, b.arch, b.dtype, b.attn_implementation)

    def _build_student(self, backbone: nn.Module) -> TagiStudent:
        h, lora = self.cfg.hypernet, self.cfg.lora
        r = h.r or lora.r
        alpha = h.alpha if h.alpha is not None else lora.alpha
        student = build_student(backbone, self.arch, self.cfg.backbone.target_modules, r, alpha, hidden=h.hidden,
                                trunk_layers=h.trunk_layers, embed_dim=h.embed_dim, fusion=h.fusion,
                                train_encoder=h.train_encoder, backend=h.kernel)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.cfg.backbone.dtype]
        student.hypernet.to(dtype)  # the engine must not mix dtypes (DEEPSPEED_CPU.md pitfall 4)
        self.r, self.alpha = r, alpha
        return student

    # ---------------------------------------------------------------------------------------- batches
    def keys_for(self, micro_index: int) -> list[tuple[int, int]]:
        """This rank's batch keys for a global micro-batch index: a pure function of (seed, index), so a resumed
        run continues with exactly the batches the uninterrupted run would have seen."""
        # Epochs may hold different numbers of batches (the task-grouped sampler packs leftovers differently each
        # epoch), so walk the epochs from the start (cached) instead of dividing by one epoch's length.
        epoch, first = getattr(self, "_epoch_first", (0, 0))
        if micro_index < first:
            epoch, first = 0, 0
        while True:
            self.sampler.set_epoch(epoch)
            n = len(self.sampler)
            if n == 0:
                raise TagiError(f"{self.stage}: the data gives no batch (no tasks or no instances)")
            if micro_index < first + n:
                break
            epoch, first = epoch + 1, first + n
        self._epoch_first = (epoch, first)
        if self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, list(self.sampler))
        return self._epoch_batches[1][micro_index - first]

    def encoding_for(self, student: TagiStudent, batch: TrainBatch) -> TaskEncoding:
        """The batch tasks' instruction encodings: precomputed rows, or (trained encoder) encoded now, with grad."""
        if self.encodings is None:
            return student.encode_instructions(batch.instr_ids, batch.instr_mask)
        return self.encodings.select(batch.task_index.cpu()).to(batch.input_ids.device)

    # ------------------------------------------------------------------------------------------ train
    def _global_means(self, sums: dict[str, float], n_tokens: float) -> dict[str, float]:
        """Token means over all ranks of each term (one all-reduce of [n, sums...])."""
        names = sorted(sums)
        t = torch.tensor([n_tokens] + [sums[k] for k in names], dtype=torch.float64)
        if world_size() > 1:
            if dist.get_backend() == "nccl":
                t = t.cuda()
            with collective_guard("loss-term all-reduce"):
                dist.all_reduce(t)
            t = t.cpu()
        n = max(float(t[0]), 1.0)
        return {"tokens": float(t[0]), **{k: float(v) / n for k, v in zip(names, t[1:].tolist())}}

    def train(self) -> dict[str, Any]:
        eng, t = self.engine, self.train_cfg
        assert eng is not None, "call setup() first"
        accum = max(1, eng.grad_accum)
        micro = eng.global_step * accum
        sums: dict[str, float] = {}
        n_tok = 0.0
        t_start = time.perf_counter()
        self.module.train()
        _ = eng.logger  # create the bar / writer now, so it starts at the (resumed) step, not one step late
        last: dict[str, float] = {}
        nonfinite_in_a_row = 0
        while eng.global_step < t.steps:
            batch = self.make_batch(self.keys_for(micro)).to(self.device)
            total, n, terms = eng(batch)
            loss = global_token_mean(total, n)
            if all_reduce_mean(1.0 if bool(torch.isfinite(loss.detach())) else 0.0) < 1.0:
                # A nan/inf loss on any rank: every rank drops this micro batch (no backward, no step) and moves
                # on to the next one; only a run of them is an error (the weights themselves are then broken).
                micro += 1
                nonfinite_in_a_row += 1
                self.summary["skipped_nonfinite_batches"] = self.summary.get("skipped_nonfinite_batches", 0) + 1
                if rank() == 0:
                    print(f"{self.stage}: non-finite loss ({float(loss.detach())}) at step {eng.global_step + 1}; "
                          f"batch skipped ({nonfinite_in_a_row} in a row)", flush=True)
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise TagiError(f"{self.stage}: the loss was non-finite on {nonfinite_in_a_row} batches in a row "
                                    f"at step {eng.global_step + 1}; lower the lr (now {self.train_cfg.lr}) or "
                                    f"check the data (last checkpoint in {self.out_dir / 'checkpoints'})")
                continue
            nonfinite_in_a_row = 0
            eng.backward(loss)
            n_local = float(n)
            micro += 1
            n_tok += n_local
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if not eng.step(tokens=int(n_local)):
                continue
            step = eng.global_step
            if step % max(1, t.log_every) == 0 or step == t.steps:
                last = self._global_means(sums, n_tok)
                if not math.isfinite(last["loss"]):
                    raise TagiError(f"{self.stage}: the loss became {last['loss']} at step {step}; lower the lr "
                                    f"or check the data (last checkpoint in {self.out_dir / 'checkpoints'})")
                self._log(step, last)
            sums, n_tok = {}, 0.0
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.steps:
                self._checkpoint(step, micro)
            if t.time_budget_s is not None and self._out_of_time(t_start, t.time_budget_s):
                self.summary["stopped_by_time_budget"] = step
                break
        self.summary.update(final_step=eng.global_step, last_logged=last, train_seconds=time.perf_counter() - t_start,
                            skipped_nonfinite_updates=getattr(eng, "skipped_updates", 0))
        self._final_micro = micro
        return self.summary

    def _out_of_time(self, t_start: float, budget: float) -> bool:
        # Every rank must stop at the same step (ZeRO-3 collectives): rank 0's clock decides.
        flag = torch.tensor([1.0 if time.perf_counter() - t_start >= budget else 0.0])
        if world_size() > 1:
            with collective_guard("time-budget broadcast"):
                dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _log(self, step: int, means: dict[str, float]) -> None:
        scalars = {k: v for k, v in means.items() if k != "tokens"}
        self.engine.log_scalars(step, scalars)
        if rank() == 0:
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:  # a log stream, appended
                fh.write(json.dumps({"step": step, "lr": self.engine.lr, **means}) + "\n")

    def _checkpoint(self, step: int, micro: int) -> None:
        self.engine.save(step, {"data_position": micro, "stage": self.stage, "variant": self.variant})
        if self.on_checkpoint is not None:
            self.on_checkpoint(step)

    # ------------------------------------------------------------------------------------------- save
    def save(self) -> Optional[Path]:
        """Final checkpoint, then the inference export (collective); returns the export folder on rank 0."""
        eng = self.engine
        step = eng.global_step
        if step > 0:
            self._checkpoint(step, getattr(self, "_final_micro", step * eng.grad_accum))
        h = self.cfg
        conf = export_config(self.student, backbone_id=self.backbone_id, target_kinds=h.backbone.target_modules,
                             r=self.r, alpha=self.alpha, dtype=h.backbone.dtype, tokenizer=h.backbone.tokenizer,
                             stage=self.stage, variant=self.variant, step=step)
        out = export_hypernetwork(self.out_dir / EXPORT_SUBDIR, self.student, conf)
        if rank() == 0:
            atomic_write_json(self.out_dir / SUMMARY_FILE, self.summary)
        return out

    def cleanup(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def run(self) -> Optional[Path]:
        self.setup()
        try:
            self.train()
            return self.save()
        finally:
            self.cleanup()
