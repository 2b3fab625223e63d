"""Typed run configuration: dataclasses, loaded from YAML, then dotted `key=value` overrides.

Every field carries its help text in `metadata["help"]`. An unknown key, a wrong type or a missing required value
raises `ConfigError` naming the file, the dotted key and what was expected. The resolved config is written next to
every output (`to_dict`), so a run can always be reproduced.

Modules below the recipes take plain arguments, never a config object: only `train/*`, `eval/*`, `pipeline.py`
and the CLI read these classes.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from .errors import ConfigError


RANGE_KEYS = ("ge", "gt", "le", "lt")


def f(default: Any = MISSING, help: str = "", *, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None,
      check: Optional[Callable[[Any], Optional[str]]] = None, **kw: Any) -> Any:
    """A dataclass field with help text and the values it accepts (checked at load, `check_field`): a numeric range
    (`ge`/`gt`/`le`/`lt`; every number must also be finite) and/or `check(value)` returning what is expected, or None
    when the value is fine. Mutable defaults become factories."""
    md = {"help": help, "range": {k: v for k, v in zip(RANGE_KEYS, (ge, gt, le, lt)) if v is not None}, "check": check}
    if default is MISSING:
        return field(metadata=md, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md, **kw)
    return field(default=default, metadata=md, **kw)


# ------------------------------------------------------------------------------------------------ value checks
LORA_KINDS = ("q", "k", "v", "o", "ffn_in", "ffn_out")  # modeling/backbone.KINDS (config sits below modeling)
_NAME_BAD = re.compile(r"[/\\\x00-\x1f]")


def plain_name(value: str) -> Optional[str]:
    """A run name is one folder under runs_dir: no path separator, not hidden, not '..', no control characters."""
    if not value or _NAME_BAD.search(value) or value.startswith(".") or value != value.strip() or len(value) > 200:
        return "a plain folder name (letters, digits, '-', '_', '.'; no '/', not starting with '.')"
    return None


def _non_empty(value: str) -> Optional[str]:
    return None if value.strip() else "a non-empty string"


def _three_lengths(value: list) -> Optional[str]:
    ok = len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    return None if ok else "3 token counts >= 1 (hypernet input, backbone input, target)"


def _lora_kinds(value: list) -> Optional[str]:
    ok = bool(value) and all(isinstance(v, str) and v in LORA_KINDS for v in value) and len(set(value)) == len(value)
    return None if ok else f"a non-empty list of distinct kinds from {list(LORA_KINDS)}"


def _non_empty_strings(value: list) -> Optional[str]:
    return None if value and all(isinstance(v, str) and v for v in value) else "a non-empty list of names"


def _positive_seconds(value: dict) -> Optional[str]:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
             for v in value.values())
    return None if ok else "a mapping of stage name to a number of seconds > 0"


def _auto_or_finite(value: Any) -> Optional[str]:
    return None  # "auto", or a number (whose finiteness check_field checks)


def describe_range(rng: dict) -> str:
    """'>= 1', '> 0', 'in [0, 1)': the allowed values of a numeric field."""
    lo = ("[", rng["ge"]) if "ge" in rng else (("(", rng["gt"]) if "gt" in rng else None)
    hi = ("]", rng["le"]) if "le" in rng else ((")", rng["lt"]) if "lt" in rng else None)
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return "any finite number"


def check_field(value: Any, fl: dataclasses.Field, key: str, where: str) -> None:
    """Raise ConfigError (one line: file, key, allowed values, the value given) when `value` is not accepted."""
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rng = fl.metadata.get("range") or {}
        ok = math.isfinite(value) and all((
            value >= rng.get("ge", -math.inf), value > rng.get("gt", -math.inf),
            value <= rng.get("le", math.inf), value < rng.get("lt", math.inf)))
        if not ok:
            finite = "" if math.isfinite(value) else "a finite number "
            raise ConfigError(f"{where}: key '{key}' must be {finite}{describe_range(rng)}, got {value!r}")
    check = fl.metadata.get("check")
    if check is not None:
        expected = check(value)
        if expected is not None:
            raise ConfigError(f"{where}: key '{key}' must be {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class SyntheticConfig:
    seed: int = f(0, "seed of the suite: operations, splits and instances are deterministic in it", ge=0)
    instances_per_task: int = f(200, "instances generated per task (train + held-back)", ge=1)
    held_back_per_task: int = f(40, "instances per seen task kept out of training, for seen-task evaluation", ge=0)
    num_unseen_compositions: int = f(6, "compositions held out entirely (unseen_composition split)", ge=0)
    min_words: int = f(3, "shortest input, in words", ge=1)
    max_words: int = f(6, "longest input, in words", ge=1)
    sorted_fraction: float = f(0.25, "fraction of inputs drawn already sorted (so is-sorted answers vary)", ge=0, le=1)


@dataclass
class DataConfig:
    source: Literal["synthetic", "sni", "p3"] = f("synthetic", "where tasks come from")
    sni_dir: Optional[str] = f(None, "SNI root with tasks/*.json and splits/ (source=sni)")
    sni_split_dir: Optional[str] = f(None, "folder with train_tasks.txt/test_tasks.txt; default <sni_dir>/splits, else <sni_dir>/splits/default")
    p3_dir: Optional[str] = f(None, "P3 root: one folder per dataset-prompt with local data files (source=p3)")
    p3_num_demonstrations: int = f(16, "P3: templated demonstrations held out from each prompt's train rows", ge=0)
    max_tasks: Optional[int] = f(None, "cap on training tasks (None = all)", ge=1)
    max_instances_per_task: int = f(100, "instances per task, capped with `seed`", ge=1)
    max_eval_instances_per_task: int = f(100, "first N instances of each test task are evaluated", ge=1)
    seen_held_back: int = f(0, "SNI/P3: last N instances of each training task kept out of training and scored as the "
                               "seen split; 0 scores training instances (labelled training-set accuracy)", ge=0)
    num_pos_examples: int = f(2, "positive examples in the instruction (Def + 2 Pos)", ge=0)
    add_task_definition: bool = f(True, "put the task definition in the instruction")
    max_source_length: int = f(1024, "tokens of the full Tk-Instruct prompt (teacher / baselines), and of the "
                                     "instruction", ge=1)
    max_input_length: int = f(128, "tokens of the instance input the student's backbone sees", ge=1)
    max_target_length: int = f(128, "tokens of the output", ge=1)
    instruction_overflow: Literal["truncate", "error"] = f("truncate", "what to do with an over-long instruction")
    synthetic: SyntheticConfig = f(default_factory=SyntheticConfig, help="offline task suite settings")
    pretrain_text: Optional[str] = f(None, "stage-1 text: a .txt / .jsonl file or a tools/convert_c4.py folder; "
                                           "'offline' = the generated demo corpus; unset is an error when stage 1 runs")
    pretrain_segment_lengths: list = f([64, 32, 32], "HINT split: tokens for (hypernet input, backbone input, "
                                       "target)", check=_three_lengths)
    pretrain_offline_docs: int = f(2000, "stage 1 without pretrain_text: documents generated offline (each one "
                                         "task)", ge=1)
    pretrain_offline_corpus: Literal["stories", "suite_words"] = f(
        "stories", "stage 1 without pretrain_text: template stories, or lines of the offline suite's words")
    seed: int = f(42, "seed for instance capping and label draws", ge=0)


@dataclass
class BackboneConfig:
    name_or_path: str = f("auto", "HF id or local path for from_pretrained; 'auto' = the run's own tiny backbone",
                          check=_non_empty)
    arch: Literal["auto", "t5", "llama"] = f("auto", "model family; auto reads config.model_type")
    tokenizer: Optional[str] = f(None, "tokenizer path/id; None = same as name_or_path")
    dtype: Literal["float32", "bfloat16", "float16"] = f("float32", "backbone compute dtype")
    target_modules: list = f(["q", "v"], "module kinds that receive LoRA: any of q, k, v, o, ffn_in, ffn_out",
                             check=_lora_kinds)
    gradient_checkpointing: bool = f(False, "non-reentrant activation checkpointing of the frozen backbone")
    attn_implementation: Optional[str] = f(None, "sdpa / flash_attention_2 / eager; None = library default")
    # Tiny backbone built by the `backbone` stage when name_or_path == auto.
    tiny_hidden: int = f(128, "tiny backbone: hidden size", ge=1)
    tiny_layers: int = f(4, "tiny backbone: layers", ge=1)
    tiny_heads: int = f(4, "tiny backbone: attention heads", ge=1)
    tiny_ffn: int = f(512, "tiny backbone: FFN size", ge=1)
    tiny_vocab: int = f(1000, "tiny backbone: sentencepiece vocabulary size", ge=16)
    pretrain_corpus: Literal["suite", "sni"] = f(
        "suite", "tiny backbone's corpus: suite = tokenizer on the synthetic suite's wording + copy pretraining; sni = "
        "tokenizer + causal-LM pretraining on the SNI train tasks' text (data.sni_dir; test tasks never read)")
    copy_pretrain_seconds: float = f(300.0, "tiny backbone: the backbone stage's time budget (s): copy pretraining "
                                            "(suite), or tokenizer + LM pretraining together (sni)", ge=0)
    copy_pretrain_lr: float = f(2e-3, "tiny backbone: copy / LM pretraining peak lr", gt=0)
    copy_pretrain_batch: int = f(32, "tiny backbone: copy / LM pretraining batch size (sequences)", ge=1)


@dataclass
class LoraConfig:
    r: int = f(32, "LoRA rank (teachers and generated adapters)", ge=1)
    alpha: float = f(64.0, "LoRA alpha; scale = alpha / r", gt=0)
    dropout: float = f(0.0, "LoRA dropout of the teachers", ge=0, lt=1)


@dataclass
class HypernetConfig:
    r: Optional[int] = f(None, "generated rank; None = lora.r", ge=1)
    alpha: Optional[float] = f(None, "generated alpha; None = lora.alpha", gt=0)
    hidden: int = f(256, "MLP trunk width", ge=1)
    trunk_layers: int = f(2, "MLP trunk depth", ge=0)
    embed_dim: int = f(64, "layer and module-type embedding size", ge=1)
    fusion: bool = f(True, "the student sees the instruction states (T5: their cross-attention K/V, projected once "
                           "per task beside the input's; LLaMA: a KV prefix)")
    train_encoder: bool = f(False, "train a copy of the instruction encoder (HINT / official code) instead of freezing it")
    kernel: Literal["auto", "reference", "triton"] = f("auto", "LoRA / head kernels: triton on CUDA when auto")
    encoder: Literal["backbone", "multitask"] = f(
        "backbone", "what reads the instruction (pooled task vector and fusion states), one of backbone | multitask: "
        "the frozen backbone, or the backbone with the tk_instruct baseline's LoRA applied (the official TAGI code "
        "reads it through Tk-Instruct's encoder; needs the baselines stage before pretrain / finetune)")
    head_lr_scale: Optional[float] = f(
        None, "lr multiplier of the heads' weight matrices; None = 1/sqrt(hidden). Adam moves each of a head row's "
        "`hidden` weights by ~lr per step, all in step, so a generated LoRA entry moves up to ~hidden x lr (a LoRA's "
        "own B moves ~lr): unscaled, the generated ΔW outgrew the backbone's weights within 100 steps and CE-only "
        "training collapsed; 1/hidden fit the seen tasks but generalised worse (configs/tiny.yaml measures it)", gt=0)


@dataclass
class TeacherConfig:
    group_by: Literal["task", "category"] = f("task", "one teacher per task or per category")
    steps: int = f(300, "optimizer steps per teacher", ge=1)
    lr: float = f(1e-3, "learning rate", gt=0)
    batch_size: int = f(16, "instances per teacher per step", ge=1)
    tasks_per_batch: int = f(8, "teachers trained together in one batch (separable losses)", ge=1)
    warmup_steps: int = f(20, "linear warmup steps", ge=0)
    time_budget_s: Optional[float] = f(None, "stop all teachers after this many seconds (demo budget)", ge=0)
    checkpoint_every: int = f(100, "steps between resumable checkpoints", ge=0)
    resume: Literal["auto", "never"] = f("auto", "resume a teacher batch from its checkpoint when one exists")
    grad_clip: float = f(1.0, "per-teacher gradient clipping norm (0 = off)", ge=0)
    array_concurrency: int = f(16, "Slurm array: at most this many array elements at once", ge=1)
    units_per_job: int = f(1, "Slurm array: teacher units per array element (e.g. 756 tasks / 16 = 48 elements, each "
                              "loading the data and the backbone once; far below a cluster's per-user job limit)", ge=1)
    write_cache: bool = f(False, "after publishing its units, the teacher stage also writes their logit-cache shards "
                                 "with the backbone already loaded (one job per units instead of two)")
    prompt: Literal["full", "input"] = f(
        "full", "what a teacher reads, one of full | input: full = the Tk-Instruct prompt (definition + demonstrations "
        "+ input); input = the instance part alone (data.max_input_length tokens), the cheapest prompt for a per-task "
        "teacher, fair because its task lives in its LoRA. The cache, the online KL and the teacher row of the report "
        "read each teacher on this prompt; the student still reads instruction + input")
    base: Literal["backbone", "multitask"] = f(
        "backbone", "what a teacher's LoRA sits on, one of backbone | multitask: the frozen backbone, or the backbone "
        "with the tk_instruct baseline's LoRA merged in (the official TAGI code: teachers on top of Tk-Instruct; needs "
        "the baselines stage before the teacher stage). L_ins then matches the task-specific part only")
    init: Literal["per_unit", "shared"] = f(
        "per_unit", "where each teacher's LoRA A starts, one of per_unit | shared: per_unit = its own seeded draw; "
        "shared = one draw for every teacher (as per-task scripts that each call set_seed(seed) before building the "
        "LoRA get, e.g. the official TAGI code's teachers). A moves little in training, so a teacher's ΔW = B A keeps "
        "its A's random directions: only with a shared A do the teachers' ΔW share a basis that L_ins can ask an "
        "instruction to predict (bench/seeds_diag.py: the generated ΔW's cosine to its teacher's)")


@dataclass
class CacheConfig:
    mode: Literal["topk", "sampled", "priority"] = f(
        "topk", "what the cache keeps per label position: topk = the k most likely ids (exact for them, a biased KL: "
        "the mass outside is lumped or dropped); sampled = num_samples draws from the teacher at T (unbiased); "
        "priority = priority sampling with top_k slots, exact head + sampled tail (unbiased; bench/kd_signal.py)")
    top_k: int = f(64, "topk: log-probs kept per label position; priority: slots per position", ge=1)
    num_samples: int = f(64, "sampled: draws from the teacher per label position", ge=1)
    temperature: float = f(2.0, "temperature the cache is written at (must equal finetune.temperature)", gt=0)
    missing_mass: Literal["renormalize", "bucket"] = f("bucket", "topk: how the KL treats teacher mass outside the top-k")
    estimator: Literal["distinct", "counts"] = f(
        "distinct", "sampled: the estimate of p at a drawn id: distinct = Horvitz-Thompson over distinct ids (lower "
        "variance), counts = count / num_samples (the paper's)")
    control: Union[Literal["auto"], float] = f(
        "auto", "sampled / priority: the zero-mean control variate's coefficient (auto = fitted per position from the "
        "other positions of the micro batch; 0 = off)", check=_auto_or_finite)
    batch_size: int = f(32, "instances per teacher forward", ge=1)


@dataclass
class LoopConfig:
    """The optimizer loop both hypernetwork stages share (data only: each stage's section adds its own fields)."""

    enabled: bool = f(True, "run this stage")
    steps: int = f(500, "optimizer steps", ge=1)
    lr: float = f(1e-3, "peak learning rate", gt=0)
    weight_decay: float = f(0.01, "AdamW weight decay", ge=0)
    warmup_steps: int = f(50, "linear warmup steps", ge=0)
    schedule: Literal["linear", "cosine", "constant"] = f("linear", "decay after warmup")
    grad_accum: int = f(1, "gradient accumulation steps", ge=1)
    grad_clip: float = f(1.0, "gradient clipping norm (0 = off)", ge=0)
    time_budget_s: Optional[float] = f(None, "stop after this many seconds", ge=0)
    checkpoint_every: int = f(200, "steps between checkpoints", ge=0)
    keep_checkpoints: int = f(2, "checkpoints kept", ge=1)
    resume: Literal["auto", "never"] = f("auto", "resume from the latest checkpoint when one exists")
    log_every: int = f(10, "steps between logged scalars", ge=1)


@dataclass
class PretrainConfig(LoopConfig):
    """Stage 1: HINT-style pretraining on plain text (CE only)."""

    micro_batch_size: int = f(16, "documents per micro batch (each document is its own task)", ge=1)


@dataclass
class FinetuneConfig(LoopConfig):
    """Stage 2: distillation, L = CE + λ_kl·KL_T(teacher‖student) + λ_ins·L_ins."""

    tasks_per_batch: int = f(4, "tasks per micro batch (k)", ge=1)
    instances_per_task: int = f(8, "instances per task per micro batch (m)", ge=1)
    lambda_kl: float = f(1.0, "weight of KL_T(teacher || student) (0 = off)", ge=0)
    lambda_ins: float = f(1.0, "weight of L_ins between generated and teacher ΔW (0 = off)", ge=0)
    temperature: float = f(2.0, "distillation temperature T (must equal cache.temperature)", gt=0)
    online_teacher: bool = f(False, "compute teacher logits live instead of reading the cache")
    init_from_pretrain: bool = f(True, "start from the pretrain export when it exists")
    teacher_cache_gib: float = f(2.0, "host memory for teacher adapters read ahead of their step (LRU, in GiB)", gt=0)
    encoding_cache_mib: float = f(
        0.0, "device memory for the frozen backbone's instruction encodings kept across steps (least-recently-used, "
        "in MiB; 0 = encode every micro batch's instructions). A batch whose instructions are all held skips the "
        "instruction pass (~12% of a step at hidden 512 x 8 layers). LLaMA holds the prefix K/V: layers x 2 x "
        "kv_width x instruction tokens x dtype bytes per task (~134 MB for LLaMA-7B at 256 tokens, bf16)", ge=0)
    kl_teacher: Literal["task_lora", "multitask"] = f(
        "task_lora", "whose logits the KL distils, one of task_lora | multitask: each task's LoRA teacher (the cache, "
        "or live with online_teacher), or the tk_instruct baseline on the full prompt, computed live (the official "
        "TAGI code's logit teacher: one multitask model; needs the baselines stage before finetune)")


@dataclass
class BaselinesConfig(LoopConfig):
    """The multitask LoRA baselines (tk_instruct: full prompt; no_instruction: instance part alone), trained on the
    same engine and sampler as the hypernetwork (bf16, activation checkpointing and ZeRO from backbone.* /
    distributed.*)."""

    steps: int = f(600, "optimizer steps per baseline", ge=1)
    tasks_per_batch: int = f(4, "tasks per micro batch (the hypernetwork's task-grouped sampler)", ge=1)
    instances_per_task: int = f(8, "instances per task per micro batch", ge=1)


@dataclass
class DistributedConfig:
    ds_config: str = f("ds_configs/zero3.json", "DeepSpeed config; its 'auto' values come from the recipe")
    zero_stage: Optional[int] = f(None, "override the ds config's ZeRO stage", ge=0, le=3)
    use_deepspeed: bool = f(True, "drive deepspeed.initialize (False = plain torch loop, one process)")
    timeout_s: float = f(600.0, "collective timeout: a rank whose peer died exits with an error after this", gt=0)
    param_persistence_threshold: Optional[int] = f(None, "stage3_param_persistence_threshold override (tests: 0)", ge=0)


@dataclass
class EvalConfig:
    methods: list = f(["no_ft", "no_instruction", "tk_instruct", "teacher", "hint", "tagi"], "methods in the report",
                      check=_non_empty_strings)
    max_new_tokens: int = f(32, "greedy decoding length", ge=1)
    batch_size: int = f(64, "instances per generation batch (rows of similar length decoded together)", ge=1)
    rank_classification: Literal["sum", "mean"] = f(
        "mean", "P3 answer-choice scoring (tasks whose instances carry answer_choices): the choice with the highest "
        "log-likelihood wins; mean = per-token mean, as TAGI's and HINT's P3 scorer (average='instance'); sum = the "
        "summed log-likelihood, as bigscience/t-zero's evaluation. They disagree when choices differ in length")
    rank_batch_size: int = f(8, "rank classification: instances per forward (all their answer choices together)",
                             ge=1)
    tasks_per_batch: int = f(
        16, "tasks answered together, the evaluation's unit of work: a hypernetwork method holds the instruction "
        "states and generated adapters of this many tasks at once, a teacher group at most this many tasks; shards "
        "split a split's units across ranks, so predictions do not depend on the number of ranks", ge=1)
    teacher_group_bytes: int = f(
        4 * 2 ** 30, "method teacher: most bytes of teacher adapters (file sizes) on the device at once; units are "
        "loaded group by group, never all together (a single larger unit is loaded alone)", ge=1)


@dataclass
class RunConfig:
    name: str = f("tiny", "run name: outputs go to <runs_dir>/<name>", check=plain_name)
    runs_dir: str = f("runs", "root of all runs", check=_non_empty)
    seed: int = f(0, "global seed", ge=0)
    device: Literal["auto", "cpu", "cuda"] = f("auto", "compute device")
    threads: Optional[int] = f(None, "torch.set_num_threads (None = leave)", ge=1)
    data: DataConfig = f(default_factory=DataConfig, help="tasks and prompts")
    backbone: BackboneConfig = f(default_factory=BackboneConfig, help="frozen backbone")
    lora: LoraConfig = f(default_factory=LoraConfig, help="LoRA shape of teachers (and default of the generator)")
    hypernet: HypernetConfig = f(default_factory=HypernetConfig, help="hypernetwork")
    teacher: TeacherConfig = f(default_factory=TeacherConfig, help="per-task LoRA teachers")
    cache: CacheConfig = f(default_factory=CacheConfig, help="teacher logit cache")
    pretrain: PretrainConfig = f(default_factory=PretrainConfig, help="stage 1: hypernetwork pretraining")
    finetune: FinetuneConfig = f(default_factory=FinetuneConfig, help="stage 2: hypernetwork distillation")
    baselines: BaselinesConfig = f(default_factory=BaselinesConfig, help="multitask LoRA baselines")
    distributed: DistributedConfig = f(default_factory=DistributedConfig, help="DeepSpeed / launcher")
    eval: EvalConfig = f(default_factory=EvalConfig, help="evaluation")
    stage_budgets_s: dict = f({}, "optional wall-clock budget per pipeline stage (s), by stage name",
                              check=_positive_seconds)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def generated_rank(self) -> int:
        """The generated adapters' LoRA rank: hypernet.r, else the teachers' lora.r."""
        return self.hypernet.r or self.lora.r

    @property
    def generated_alpha(self) -> float:
        """The generated adapters' LoRA alpha: hypernet.alpha, else lora.alpha."""
        return self.hypernet.alpha if self.hypernet.alpha is not None else self.lora.alpha


# --------------------------------------------------------------------------------------------- typed loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float). Raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string; every user writes lrs that way
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
        raise bad
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise bad


# Keys that moved: a config written for an older version gets told where the key lives now.
MOVED_KEYS = {"eval.baseline_steps": "baselines.steps", "eval.baseline_lr": "baselines.lr",
              "eval.baseline_batch_size": "baselines.tasks_per_batch x baselines.instances_per_task",
              "eval.baseline_time_budget_s": "baselines.time_budget_s",
              "baselines.batch_size": "baselines.tasks_per_batch x baselines.instances_per_task"}


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {fl.name: fl for fl in fields(cls)}
    for k in data:
        if f"{prefix}{k}" in MOVED_KEYS:
            raise ConfigError(f"{where}: key '{prefix}{k}' moved to '{MOVED_KEYS[prefix + k]}'")
        if k not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(f"{where}: unknown key '{prefix}{k}'; expected one of: {choices}")
    kwargs = {}
    for name, fl in known.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, where)
            check_field(kwargs[name], fl, prefix + name, where)
        elif fl.default is MISSING and fl.default_factory is MISSING:  # type: ignore[misc]
            raise ConfigError(f"{where}: required key '{prefix}{name}' is missing ({fl.metadata.get('help', '')})")
    obj = cls(**kwargs)
    # A default_factory section that was only partly given still needs its defaults merged: done by cls(**kwargs).
    for name, expected in _cross_checks(obj):
        raise ConfigError(f"{where}: key '{prefix}{name}' must be {expected}")
    return obj


def _cross_checks(obj: Any) -> list[tuple[str, str]]:
    """(key, what it must be) for values that are fine alone but not together."""
    if isinstance(obj, SyntheticConfig) and obj.max_words < obj.min_words:
        return [("max_words", f">= min_words ({obj.min_words}), got {obj.max_words}")]
    return []


def _parse_override_value(text: str) -> Any:
    """`key=value` values are YAML scalars: 3, 0.5, true, null, [q, v], 'text'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{loc} malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; expected a mapping of config keys (for example "
                          f"configs/tiny.yaml), never the bare defaults, which would write into runs/tiny")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Load `cls` from a YAML file (optional) and dotted `key=value` overrides, validating every key and type.

    A YAML file may name a parent with `base: other.yaml` (relative to itself); the child's keys win.
    """
    tree: dict = {}
    where = "<defaults>"
    if path is not None:
        tree = _load_with_base(Path(path))
        where = str(path)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}': expected key=value (for example finetune.steps=100)")
        key, val = ov.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_override_value(val))
    if overrides:
        where = f"{where} (with overrides {' '.join(overrides)})"
    return _build(cls, tree, where)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_base(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a path to another YAML file, got {base!r}")
    parent = _load_with_base((path.parent / base), seen + (path.resolve(),))
    return _merge(parent, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: used by `tagi-ds config --help-keys` and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for fl in fields(cls):
        tp = hints[fl.name]
        if is_dataclass(tp):
            rows += describe(tp, prefix + fl.name + ".")
            continue
        default = fl.default if fl.default is not MISSING else (
            fl.default_factory() if fl.default_factory is not MISSING else "<required>")  # type: ignore[misc]
        rows.append((prefix + fl.name, repr(default), fl.metadata.get("help", "")))
    return rows
