"""Stage 2 `tagi-ds finetune`: hypernetwork distillation, L = CE + λ_kl·KL_T(teacher‖student) + λ_ins·L_ins.

- CE: the student's token cross-entropy on the instance targets.
- KL: T²·KL at temperature T against the teacher's top-k read from the logit cache (`CachedTeacherSignal`,
  `cache.missing_mass`), or, with `finetune.online_teacher`, against the teacher's full distribution computed live
  (backbone + the teacher's LoRA through the student's own hooks, full Tk-Instruct prompt, no grad).
- L_ins: per task, the mean over target modules of ‖ΔW_gen − ΔW_teacher‖²_F / ‖ΔW_teacher‖²_F (`delta_w_distance`);
  teacher adapters are read lazily per task from `teachers/<unit>/` (PEFT directories, memory-mapped).
A zero weight switches a term off: never computed, never logged.

Every term is a token-weighted sum (L_ins: each task's value weighted by its label tokens), divided by the global
batch's token count (`global_token_mean`), so 1 process and N ranks optimise the same objective.

    torchrun --nproc_per_node 2 -m tagi_ds.cli finetune --config configs/tiny.yaml variant=tagi
    tagi-ds finetune --config configs/tiny.yaml variant=hint finetune.lambda_kl=0 finetune.lambda_ins=0
Outputs: <run_dir>/finetune/<variant>/{checkpoints/, export/, metrics.jsonl, summary.json, config.yaml}, TensorBoard
under <run_dir>/tb/finetune/<variant>. Starts from <run_dir>/pretrain/export when it exists and
finetune.init_from_pretrain.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

from ..adapters.peft_io import read_peft_adapter
from ..data.collate import TaskInstanceDataset, collate_full, collate_student, instruction_ids
from ..data.registry import load_run_tasks_from_config
from ..data.sampler import TaskGroupedSampler
from ..data.tasks import Task
from ..distill.l_ins import delta_w_distance
from ..distill.losses import distillation_loss, teacher_kl
from ..distill.signal import CachedTeacherSignal
from ..distill.sparse_kl import dense_kl
from ..errors import ArtifactMismatchError, ConfigError
from ..modeling.tagi import TagiStudent
from . import checkpoint as ck
from .distributed import rank, world_size
from .export import EXPORT_SUBDIR
from .hypernet_trainer import HypernetTrainer, TrainBatch, ce_sum, label_positions, student_logits
from .run_paths import RunPaths

STAGE = "finetune"
EXTRA_KEYS = ("variant",)
TEACHER_CACHE_SIZE = 64  # teacher adapters kept in memory (read lazily, memory-mapped)


def teacher_unit(task: Task, group_by: str) -> str:
    """The teacher folder that holds `task`'s adapter: the task itself, or its first category."""
    if group_by == "task":
        return task.name
    if not task.categories:
        raise ConfigError(f"teacher.group_by=category but task '{task.name}' lists no category")
    return str(task.categories[0])


class FinetuneTrainer(HypernetTrainer):
    stage = STAGE

    def __init__(self, cfg, variant: str = "tagi", **kw):
        self.paths = RunPaths.of(cfg)
        if not variant or "/" in variant or variant.startswith("."):
            raise ConfigError(f"finetune variant {variant!r}: expected a plain folder name (tagi, hint, ...)")
        super().__init__(cfg, cfg.finetune, self.paths.stage_dir(STAGE) / variant, self.paths.tb(f"{STAGE}/{variant}"),
                         variant=variant, **kw)
        t = cfg.finetune
        if t.lambda_kl < 0 or t.lambda_ins < 0:
            raise ConfigError(f"finetune.lambda_kl={t.lambda_kl} / lambda_ins={t.lambda_ins}: weights must be >= 0")
        if t.lambda_kl > 0 and not t.online_teacher and float(cfg.cache.temperature) != float(t.temperature):
            raise ConfigError(f"cache.temperature={cfg.cache.temperature} must equal finetune.temperature="
                              f"{t.temperature}: the cached top-k was taken at the cache's temperature")
        self._teachers: OrderedDict[str, tuple[dict, float]] = OrderedDict()

    # ------------------------------------------------------------------------------------------ weights
    def pretrain_export(self) -> Path:
        return self.paths.stage_dir("pretrain") / EXPORT_SUBDIR

    def init_weights(self, student: TagiStudent) -> None:
        src = self.pretrain_export()
        if self.train_cfg.init_from_pretrain and (src / ck.EXPORT_CONFIG).is_file():
            ck.load_trainable(src, student, strict=True)  # names and shapes must match: same hypernet config
            self.summary["init_from"] = str(src)
        else:
            self.summary["init_from"] = None

    # --------------------------------------------------------------------------------------------- data
    def build_data(self):
        from .teacher import prompt_settings

        self.tasks = load_run_tasks_from_config(self.cfg)["train"]
        self.task_pos = {t.name: i for i, t in enumerate(self.tasks)}
        self.settings = prompt_settings(self.cfg, self.arch)
        self.dataset = TaskInstanceDataset(self.tasks)
        self._instr_cache = {t.name: instruction_ids(t, self.tokenizer, self.settings) for t in self.tasks}
        rows = [self._instr_cache[t.name] for t in self.tasks]
        tc = self.train_cfg
        sampler = TaskGroupedSampler(self.dataset.task_sizes, tc.tasks_per_batch, tc.instances_per_task, rank=rank(),
                                     world_size=world_size(), seed=self.cfg.seed)
        self.signal = None
        if tc.lambda_kl > 0 and not tc.online_teacher:
            self.signal = CachedTeacherSignal(self.paths.logit_cache, expect=self._shard_expect)
        self.check_teacher_artifacts()
        self.summary["tasks"] = len(self.tasks)
        self.summary["terms"] = ["ce"] + [n for n, w in (("kl", tc.lambda_kl), ("l_ins", tc.lambda_ins)) if w > 0]
        return rows, sampler

    def check_teacher_artifacts(self) -> None:
        """Refuse a missing or mismatched teacher / cache shard now, before anything is written (the full
        checksums are still verified when a shard is first read)."""
        from ..adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
        from ..distill.logit_cache import CacheShardReader

        tc = self.train_cfg
        for task in self.tasks:
            if tc.lambda_ins > 0 or tc.lambda_kl > 0:  # both need the task's teacher adapter
                tdir = self.teacher_dir(task)
                for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    if not (tdir / f).is_file():
                        raise ArtifactMismatchError(f"{tdir / f}: missing; finetune needs the teacher of task "
                                                    f"'{task.name}' (run `tagi-ds teacher` first)")
            if self.signal is not None:
                shard = self.paths.cache_shard(task.name)
                if not shard.is_dir():
                    raise ArtifactMismatchError(f"{shard}: no logit-cache shard for task '{task.name}'; run "
                                                f"`tagi-ds cache-logits` first")
                CacheShardReader(shard, self._shard_expect(task.name), verify=False)  # names a differing field

    def _shard_expect(self, task_name: str) -> dict:
        """The manifest a shard must carry for this run (the cache stage's own definition)."""
        from ..distill.logit_cache import tokenizer_hash
        from .cache_logits import shard_fields
        from .teacher import backbone_identity

        if not hasattr(self, "_tok_hash"):
            self._tok_hash = tokenizer_hash(self.tokenizer)
        task = self.tasks[self.task_pos[task_name]]
        return shard_fields(tokenizer_hash=self._tok_hash, backbone_id=backbone_identity(self.backbone_id),
                            teacher_dir=self.teacher_dir(task), task=task, top_k=self.cfg.cache.top_k,
                            temperature=self.cfg.cache.temperature, settings=self.settings,
                            vocab_size=int(self.student.backbone.config.vocab_size))

    def teacher_dir(self, task: Task) -> Path:
        return self.paths.teacher(teacher_unit(task, self.cfg.teacher.group_by))

    def teacher_adapter(self, task_name: str) -> tuple[dict, float]:
        """(adapters {module_type: (A (L, r, d_in), B (L, d_out, r))}, scale) of a task's teacher, read lazily."""
        if task_name not in self._teachers:
            task = self.tasks[self.task_pos[task_name]]
            adapters, scale, _ = read_peft_adapter(self.teacher_dir(task), self.student.specs)
            self._teachers[task_name] = (adapters, scale)
            while len(self._teachers) > TEACHER_CACHE_SIZE:
                self._teachers.popitem(last=False)
        self._teachers.move_to_end(task_name)
        return self._teachers[task_name]

    def make_batch(self, keys: list[tuple[int, int]]) -> TrainBatch:
        pairs = [self.dataset[k] for k in keys]
        sb = collate_student(pairs, self.tokenizer, self.settings, instruction_cache=self._instr_cache)
        full = collate_full(pairs, self.tokenizer, self.settings) if self.train_cfg.online_teacher else None
        index = torch.tensor([self.task_pos[n] for n in sb.task_names], dtype=torch.long)
        return TrainBatch(task_index=index, task_ids=sb.task_ids, input_ids=sb.input_ids,
                          attention_mask=sb.attention_mask, labels=sb.labels, instr_ids=sb.instr_ids,
                          instr_mask=sb.instr_mask, task_names=sb.task_names, instance_ids=sb.instance_ids, extra=full)

    # --------------------------------------------------------------------------------------------- loss
    def loss_terms(self, student: TagiStudent, batch: TrainBatch):
        tc = self.train_cfg
        enc = self.encoding_for(student, batch)
        adapters = student.generate_adapters(enc)  # reused by L_ins
        logits, targets, mask = label_positions(student_logits(student, enc, batch, adapters), batch.labels,
                                                student.arch)
        ce, n = ce_sum(logits, targets, mask)
        total, terms = distillation_loss(
            ce, lambda: self.kl_sum(student, batch, logits, mask), lambda: self.l_ins_sum(student, batch, adapters, mask),
            tc.lambda_kl, tc.lambda_ins)
        return total, n, terms

    def kl_sum(self, student: TagiStudent, batch: TrainBatch, logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Σ over label tokens of T²·KL_T(teacher ‖ student) (a token mean × tokens, per task)."""
        tc = self.train_cfg
        if tc.online_teacher:
            t_logits = self.online_teacher_logits(student, batch)  # (N, L, V), same label layout
            if t_logits.shape[:2] != logits.shape[:2]:
                raise ArtifactMismatchError(f"online teacher: label positions {tuple(t_logits.shape[:2])} differ "
                                            f"from the student's {tuple(logits.shape[:2])}")
            return dense_kl(logits, t_logits, mask, tc.temperature) * mask.sum()
        total = logits.new_zeros((), dtype=torch.float32)
        for j, name in enumerate(batch.task_names):
            rows = (batch.task_ids == j).nonzero().squeeze(-1)
            m = mask.index_select(0, rows)
            ids = [batch.instance_ids[i] for i in rows.tolist()]
            kl = teacher_kl(logits.index_select(0, rows), m, self.signal, name, ids, tc.temperature,
                            missing_mass=self.cfg.cache.missing_mass)
            total = total + kl.float() * m.sum()
        return total

    @torch.no_grad()
    def online_teacher_logits(self, student: TagiStudent, batch: TrainBatch) -> torch.Tensor:
        """The teachers' logits at the label positions of the full-prompt batch: the backbone with each row's
        teacher LoRA added by the student's own hooks (B scaled by s_teacher / s_student)."""
        full = batch.extra
        dev = full.input_ids.device
        dtype = next(iter(self.module.parameters())).dtype
        per_task = [self.teacher_adapter(name) for name in full.task_names]
        stacked = {}
        for mt in per_task[0][0]:
            A = torch.stack([a[mt][0] for a, _ in per_task]).to(dev, dtype)
            B = torch.stack([a[mt][1] * (s / student.lora_scale) for a, s in per_task]).to(dev, dtype)
            stacked[mt] = (A, B)
        bb = student.backbone
        with student.hooks.apply(stacked, full.task_ids):
            if student.arch == "t5":
                out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask,
                         decoder_input_ids=bb._shift_right(full.labels), use_cache=False)
            else:
                out = bb(input_ids=full.input_ids, attention_mask=full.attention_mask, use_cache=False)
        logits, _, _ = label_positions(out.logits, full.labels, student.arch)
        return logits

    def l_ins_sum(self, student: TagiStudent, batch: TrainBatch, adapters: dict, mask: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's tasks of (label tokens of the task) × mean over target modules of the normalised
        ‖ΔW_gen − ΔW_teacher‖²."""
        tokens = torch.bincount(batch.task_ids, weights=mask.sum(-1).float(), minlength=len(batch.task_names))
        total = None
        for j, name in enumerate(batch.task_names):
            t_adapters, s_t = self.teacher_adapter(name)
            dists = []
            for mt, (A_g, B_g) in adapters.items():
                A_t, B_t = (x.to(A_g.device) for x in t_adapters[mt])
                dists.append(delta_w_distance(A_g[j], B_g[j], student.lora_scale, A_t, B_t, s_t))  # (L,)
            value = torch.cat(dists).float().mean() * tokens[j]
            total = value if total is None else total + value
        return total


def run(cfg, variant: str = "tagi", on_checkpoint: Optional[Callable[[int], None]] = None,
        show_progress: bool = True):
    """Train stage 2 as `variant` and write its export; returns the export folder (rank 0) or None."""
    if not cfg.finetune.enabled:
        return None
    return FinetuneTrainer(cfg, variant=variant, on_checkpoint=on_checkpoint, show_progress=show_progress).run()


def main(args) -> int:
    variant = (getattr(args, "extra", None) or {}).get("variant", "tagi")
    out = run(args.cfg, variant=variant)
    if out is not None:
        print(f"finetune ({variant}): hypernetwork export in {out}")
    return 0
