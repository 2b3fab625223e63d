"""Stage 2 `tagi-ds finetune`: hypernetwork distillation, L = CE + λ_kl·KL_T(teacher‖student) + λ_ins·L_ins
(train/distill_step.py), from the pretrain export when it exists and finetune.init_from_pretrain.

    torchrun --nproc_per_node 2 -m tagi_ds.cli finetune --config configs/tiny.yaml variant=tagi
    tagi-ds finetune --config configs/tiny.yaml variant=hint finetune.lambda_kl=0 finetune.lambda_ins=0
Outputs: <run_dir>/finetune/<variant>/{checkpoints/, export/, metrics.jsonl, summary.json, stage.json,
config.yaml}, TensorBoard under <run_dir>/tb/finetune/<variant>. The pipeline trains each variant its methods need
with the variant's overrides (run/methods.py); a plain `variant=NAME` here only names the folder.

The official TAGI code's set-up, as options (README "Distillation set-ups"):
- finetune.kl_teacher=multitask: the KL's teacher is the tk_instruct baseline (one multitask LoRA, full prompt),
  computed live (`MultitaskTeacherLoss`); L_ins still reads each task's own teacher.
- hypernet.encoder=multitask: the student reads every instruction through backbone + the tk_instruct LoRA.
Both read the baselines stage's tk_instruct folder, so that stage must run first.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..data.collate import (PromptSettings, TaskInstanceDataset, collate_full, collate_student, instruction_ids,
                            pad_id)
from ..data.registry import load_run_tasks_from_config
from ..data.sampler import EpochPositions, TaskGroupedSampler
from ..data.tasks import Task
from ..distill.logit_cache import MANIFEST_FILE, CacheShardReader, check_expect, tokenizer_hash
from ..distill.signal import CachedTeacherSignal
from ..errors import ArtifactMismatchError, ConfigError
from ..run.dist import world_size
from ..run.artifacts import check_temperatures, shard_fields, teacher_stat_matches, weights_sha256
from ..run.backbone import backbone_identity
from ..run.export_io import EXPORT_CONFIG, load_trainable
from ..run.identity import check_stage_record, config_identity, task_data
from ..run.paths import RunPaths, check_unit_name
from ..run.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..run.peft_io import read_peft_adapter
from ..run.prompts import prompt_settings, teacher_reads_instruction
from ..run.units import teacher_unit
from ..run.stage_lock import stage_locked
from .cache_writer import multitask_adapter_dir, teacher_shard_fields
from .distill_step import DistillLoss, TeacherAdapters, hooked_label_logits
from .engine_stage import StageSpec, train_stage
from .hypernet_loop import StudentSetup, TrainBatch, bucket_instructions, hypernet_stage, setup_student

STAGE = "finetune"
EXTRA_KEYS = ("variant",)


def uses_pretrain(cfg) -> bool:
    return bool(cfg.finetune.init_from_pretrain and cfg.pretrain.enabled)


def reads_multitask(cfg) -> bool:
    """The finetune reads the tk_instruct baseline (KL teacher, instruction encoder or the teachers' base)."""
    f = cfg.finetune
    return ((f.lambda_kl > 0 and f.kl_teacher == "multitask") or cfg.hypernet.encoder == "multitask"
            or cfg.teacher.base == "multitask")


def kl_from_cache(cfg) -> bool:
    """The KL reads the task teachers' logit cache (not a live teacher)."""
    f = cfg.finetune
    return f.lambda_kl > 0 and not f.online_teacher and f.kl_teacher == "task_lora"


def identity(cfg, sub: Optional[str] = None) -> dict:
    """Everything but the evaluation: the task data, teachers and their cache (the KL / L_ins targets), the multitask
    baseline when it is read, and stage 1 when the finetune starts from its export. `sub` is the variant (a folder
    name: the config carries its overrides)."""
    sections = ("seed", "data", "backbone", "lora", "hypernet", "teacher", "cache", "finetune")
    if reads_multitask(cfg):
        sections += ("baselines",)
    if uses_pretrain(cfg):
        return config_identity(cfg, sections + ("pretrain",))
    return task_data(config_identity(cfg, sections))


class FinetuneBatches:
    """The training tasks' instances in task-grouped micro batches, by global position; each micro batch carries
    its own tasks' instructions (tokenized when a batch first needs them, a few hundred ids per task)."""

    def __init__(self, tasks: list[Task], tokenizer, settings: PromptSettings, *, tasks_per_batch: int,
                 instances_per_task: int, seed: int, online_teacher: bool,
                 lookahead: Optional[Callable[[list[str]], None]] = None, stride: int = 1,
                 teacher_instruction: bool = True):
        self.tasks, self.tokenizer, self.settings = tasks, tokenizer, settings
        self.teacher_instruction = teacher_instruction  # the live teacher's prompt: full, or the instance part
        self.task_pos = {t.name: i for i, t in enumerate(tasks)}
        self.dataset = TaskInstanceDataset(tasks)
        self._instr: dict[str, list[int]] = {}
        # The global batch list (the same on every rank): rank r takes positions r, r + W, ... (hypernet_loop).
        self.positions = EpochPositions(TaskGroupedSampler(self.dataset.task_sizes, tasks_per_batch,
                                                           instances_per_task, seed=seed))
        self.online_teacher = online_teacher
        self.lookahead, self.stride = lookahead, stride  # this rank's next position is position + stride (= W)

    def tasks_at(self, position: int) -> list[str]:
        return sorted({self.tasks[t].name for t, _ in self.positions.keys(position)})

    def batch(self, position: int) -> TrainBatch:
        pairs = [self.dataset[k] for k in self.positions.keys(position)]
        if self.lookahead is not None:  # the teachers of this rank's NEXT micro batch start loading now
            self.lookahead(self.tasks_at(position + self.stride))
        sb = collate_student(pairs, self.tokenizer, self.settings, instruction_cache=self._instr)
        full = (collate_full(pairs, self.tokenizer, self.settings, with_instruction=self.teacher_instruction)
                if self.online_teacher else None)
        index = torch.tensor([self.task_pos[n] for n in sb.task_names], dtype=torch.long)
        instr_ids, instr_mask = bucket_instructions(sb.instr_ids, sb.instr_mask, pad_id(self.tokenizer))
        return TrainBatch(task_index=index, task_ids=sb.task_ids, input_ids=sb.input_ids,
                          attention_mask=sb.attention_mask, labels=sb.labels, instr_ids=instr_ids,
                          instr_mask=instr_mask, task_names=sb.task_names, instance_ids=sb.instance_ids, extra=full)


class MultitaskTeacherLoss(DistillLoss):
    """finetune.kl_teacher=multitask: the KL's teacher is ONE model for every task, the tk_instruct baseline (backbone
    + its LoRA, through the student's own hooks, B scaled by s_multitask / s_student) reading the full Tk-Instruct
    prompt, computed live without grad: the official TAGI code's logit teacher. L_ins still reads each task's own
    teacher (`teachers`)."""

    def __init__(self, *, multitask: tuple[dict, float], **kw):
        super().__init__(online_teacher=True, **kw)
        self.multitask = multitask  # ({module type: (A (L, r, d_in), B (L, d_out, r))}, scale)

    @torch.no_grad()
    def online_teacher_logits(self, student, batch) -> torch.Tensor:
        full = batch.extra  # FullPromptBatch of the same instances, full prompt
        dev = full.input_ids.device
        dtype = next(student.hypernet.parameters()).dtype
        adapters, scale = self.multitask
        one = {mt: (a[None].to(dev, dtype), (b * (scale / student.lora_scale))[None].to(dev, dtype))
               for mt, (a, b) in adapters.items()}
        return hooked_label_logits(student, one, torch.zeros_like(full.task_ids), full)  # (N, L, V), student layout


def check_teacher_artifacts(cfg, tasks: list[Task], paths: RunPaths, shard_expect) -> None:
    """Refuse a missing or mismatched teacher / cache shard now, before anything is written. Cheap: file presence and
    every shard manifest field but the teacher weights' hash; that hash and the shard's checksums are verified once,
    when the shard is first read (ahead of its step, in the read-ahead thread). Teacher weights whose size or mtime
    differ from what the shard recorded are hashed here (run.artifacts.TEACHER_STAT_FILE)."""
    f = cfg.finetune
    for task in tasks:
        if f.lambda_ins > 0 or (f.lambda_kl > 0 and f.kl_teacher == "task_lora"):  # the task's teacher adapter
            tdir = paths.teacher(teacher_unit(task, cfg.teacher.group_by))
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if not (tdir / name).is_file():
                    raise ArtifactMismatchError(f"{tdir / name}: missing; finetune needs the teacher of task "
                                                f"'{task.name}' (run `tagi-ds teacher` first)")
        if kl_from_cache(cfg):
            shard = paths.cache_shard(task.name)
            if not shard.is_dir():
                raise ArtifactMismatchError(f"{shard}: no logit-cache shard for task '{task.name}'; run "
                                            f"`tagi-ds cache-logits` first")
            reader = CacheShardReader(shard, shard_expect(task.name, False), verify=False)  # names a differing field
            weights = tdir / ADAPTER_WEIGHTS
            if not teacher_stat_matches(shard, weights):  # changed since the cache (or no record): hash it now
                check_expect(reader.manifest, {"teacher_adapter_hash": weights_sha256(weights)},
                             str(shard / MANIFEST_FILE))


def init_from_pretrain(cfg, setup: StudentSetup, paths: RunPaths) -> Optional[str]:
    """Start from the pretrain export (same hypernetwork config: names and shapes must match); its path or None."""
    src = paths.pretrain_export
    if cfg.finetune.init_from_pretrain and (src / EXPORT_CONFIG).is_file():
        load_trainable(src, setup.student, strict=True)
        return str(src)
    return None


def build_stage(cfg, variant: str, setup: StudentSetup, record: Optional[dict]) -> StageSpec:
    """The finetune's stage description around a set-up student: the pretrain init, the tasks' batches, the
    teacher signal and the distillation loss, after checking every teacher and shard it will read."""
    f, paths = cfg.finetune, RunPaths.of(cfg)
    init_from = init_from_pretrain(cfg, setup, paths)
    tasks = load_run_tasks_from_config(cfg)["train"]
    settings = prompt_settings(cfg, setup.arch)
    by_name = {t.name: t for t in tasks}
    teacher_dir = lambda name: paths.teacher(teacher_unit(by_name[name], cfg.teacher.group_by))  # noqa: E731
    tok_hash, bb_id = tokenizer_hash(setup.tokenizer), backbone_identity(setup.backbone_path)
    vocab = int(setup.student.backbone.config.vocab_size)

    def shard_expect(name: str, with_teacher_hash: bool = True) -> dict:  # the cache stage's own definition
        return {**shard_fields(cfg, by_name[name], arch=setup.arch, tokenizer_hash=tok_hash, backbone_id=bb_id,
                               teacher_dir=teacher_dir(name), vocab_size=vocab, settings=settings,
                               with_teacher_hash=with_teacher_hash), **teacher_shard_fields(cfg)}

    multitask = None  # (adapters, scale) of the tk_instruct baseline, when something reads it
    if cfg.hypernet.encoder == "multitask" or (f.lambda_kl > 0 and f.kl_teacher == "multitask"):
        folder = multitask_adapter_dir(cfg, "hypernet.encoder=multitask / finetune.kl_teacher=multitask")
        adapters, scale, _ = read_peft_adapter(folder, setup.student.specs, device="cpu")
        multitask = (adapters, scale)
        if cfg.hypernet.encoder == "multitask":
            setup.student.set_instruction_adapter(adapters, scale)
    signal = CachedTeacherSignal(paths.logit_cache, expect=shard_expect) if kl_from_cache(cfg) else None
    if settings.instruction_overflow == "error":  # refuse a too-long instruction now, not at the step that meets it
        for task in tasks:
            instruction_ids(task, setup.tokenizer, settings)
    check_teacher_artifacts(cfg, tasks, paths, shard_expect)
    live_multitask = f.lambda_kl > 0 and f.kl_teacher == "multitask"
    live_task = f.lambda_kl > 0 and f.online_teacher and not live_multitask
    needs_adapters = f.lambda_ins > 0 or live_task
    teachers = TeacherAdapters(teacher_dir, setup.student.specs, int(f.teacher_cache_gib * 2 ** 30),
                               also=signal.shard if signal is not None else None, adapters=needs_adapters)
    reads_ahead = needs_adapters or signal is not None
    # the live teacher's prompt: the multitask model reads the full prompt, a task teacher its own (teacher.prompt)
    batches = FinetuneBatches(tasks, setup.tokenizer, settings, tasks_per_batch=f.tasks_per_batch,
                              instances_per_task=f.instances_per_task, seed=cfg.seed,
                              online_teacher=live_task or live_multitask,
                              lookahead=teachers.prefetch if reads_ahead else None, stride=world_size(),
                              teacher_instruction=live_multitask or teacher_reads_instruction(cfg))
    c = cfg.cache
    common = dict(lambda_kl=f.lambda_kl, lambda_ins=f.lambda_ins, temperature=f.temperature, signal=signal,
                  teachers=teachers,
                  kl_options={"missing_mass": c.missing_mass, "estimator": c.estimator, "control": c.control})
    loss = (MultitaskTeacherLoss(multitask=multitask, **common) if live_multitask
            else DistillLoss(online_teacher=f.online_teacher, **common))
    terms = ["ce"] + [n for n, w in (("kl", f.lambda_kl), ("l_ins", f.lambda_ins)) if w > 0]
    def close(summary: dict) -> None:
        teachers.close()
        summary["teacher_reads"] = dict(teachers.stats)

    return hypernet_stage(setup, name=STAGE, out_dir=paths.finetune(variant), tb_dir=paths.tb(f"{STAGE}/{variant}"),
                          loop=f, record=record, batches=batches, loss=loss, variant=variant,
                          summary={"init_from": init_from, "tasks": len(tasks), "terms": terms}, close=close,
                          encoding_cache_bytes=int(f.encoding_cache_mib * 2 ** 20))


def check_config(cfg, variant: str) -> None:
    f = cfg.finetune
    check_unit_name(variant)
    if f.lambda_kl < 0 or f.lambda_ins < 0:
        raise ConfigError(f"finetune.lambda_kl={f.lambda_kl} / lambda_ins={f.lambda_ins}: weights must be >= 0")
    if kl_from_cache(cfg):
        check_temperatures(cfg.cache.temperature, f.temperature)
    if live_task_on_multitask_base(cfg):
        raise ConfigError("finetune.online_teacher with teacher.base=multitask: the live teacher runs on the student's "
                          "raw backbone; write the cache instead (finetune.online_teacher=false)")


def live_task_on_multitask_base(cfg) -> bool:
    f = cfg.finetune
    return f.lambda_kl > 0 and f.online_teacher and f.kl_teacher == "task_lora" and cfg.teacher.base == "multitask"


@stage_locked("finetune")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = "tagi", *, progress: bool = True, log: Callable[[str], None] = print,
        on_checkpoint: Optional[Callable[[int], None]] = None):
    """Train stage 2 as variant `sub` and write its export; returns the export folder (rank 0) or None."""
    variant = sub or "tagi"
    f = cfg.finetune
    if not f.enabled:
        return None
    check_config(cfg, variant)
    record = check_stage_record(RunPaths.of(cfg).finetune(variant), STAGE, identity(cfg))
    setup = setup_student(cfg, micro_batch=f.tasks_per_batch * f.instances_per_task, loop=f)
    spec = build_stage(cfg, variant, setup, record)
    return train_stage(setup, spec, on_checkpoint=on_checkpoint, show_progress=progress)


def main(args) -> int:
    variant = (getattr(args, "extra", None) or {}).get("variant", "tagi")
    out = run(args.cfg, variant)
    if out is not None:
        print(f"finetune ({variant}): hypernetwork export in {out}")
    return 0
