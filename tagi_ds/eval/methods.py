"""Every evaluated method as one object: which splits it answers, which files it reads, and how it answers one work
unit of tasks (eval/shards.py). Evaluation only READS finished stage folders; a method whose folder is missing has
no numbers.

How each method runs at test time (run/methods.py names them; the same backbone, tokenizer, prompt encoder, greedy
decoder and rank classifier for all):
- no_ft: the frozen backbone reads the full Tk-Instruct prompt.
- no_instruction / tk_instruct: the multitask LoRA baselines (baselines/<mode>, a PEFT adapter folder), merged into
  the run's own backbone for the method's duration and restored exactly afterwards (the original target weights wait
  on the host: never a second copy of the backbone on the device).
- teacher: each seen task's own LoRA teacher on the full prompt, through the batched LoRA hooks; teachers are loaded
  unit by unit of work, at most eval.teacher_group_bytes of adapters at once. No number on unseen tasks.
- hint, tagi and the ablations: a hypernetwork export (finetune/<variant>/export) wrapped around the run's backbone.
  Per unit of at most eval.tasks_per_batch tasks: the instructions are encoded once per task, the adapters generated
  in one hypernetwork call, then the unit's instances are answered together, each row with its task's LoRA and
  instruction states (fusion).
Tasks whose instances carry answer choices (P3's classification prompts) are rank-classified
(eval/rank_classification.py: one forward callable per task, the same scorer for every method); the others are
answered by greedy decoding (run/decode.py). Rows: {"task", "id", "prediction"} (+ "choice", "label", "scores" when
rank-classified; "prediction" is then the chosen answer's text).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch

from ..data.collate import WIDTH_BUCKET, encode_student_input, instruction_ids, pad_id
from ..data.prompts import build_task_input
from ..data.tasks import Task
from ..errors import ArtifactMismatchError, ConfigError
from ..modeling.lora import BatchedLoraHooks, merged_in_place
from ..run.backbone import LoadedBackbone
from ..run.decode import DecodeStats, OnBatch, decode_prompts, decode_student
from ..run.export_io import EXPORT_CONFIG, load_student_from_export
from ..run.methods import ALL_METHODS, BASELINES, HYPERNET_METHODS
from ..run.paths import RunPaths
from ..run.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter
from ..run.prompts import prompt_settings, source_ids
from ..run.units import teacher_unit
from .rank_classification import ForwardFn, has_answer_choices, module_forward, rank_classify_ids

Log = Callable[[str], None]


@dataclass
class Answerer:
    """How a method answers the tasks of one unit (task indices are positions in the unit's task list)."""

    sources: Callable[[int], list[list[int]]]    # task → the token ids each of its instances reads
    generate: Callable[[list[list[int]], list[int], DecodeStats, OnBatch], list[str]]  # (rows, row → task) → texts
    forward: Callable[[int], ForwardFn]           # task → its rank-classification forward


@dataclass
class UnitStats:
    """What answering produced: instances, generated tokens, rank-classified instances and the tokens they fed."""

    decode: DecodeStats = field(default_factory=DecodeStats)
    rank_classified: int = 0
    forwarded_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"generated": self.decode.rows, "generated_tokens": self.decode.new_tokens,
                "rank_classified": self.rank_classified, "forwarded_tokens": self.forwarded_tokens}


class Method(Protocol):
    name: str

    def answers(self, split: str) -> bool: ...
    def artifacts(self) -> list[Path]: ...
    def unit_of(self) -> Optional[Callable[[Task], str]]: ...
    def unit_bytes(self, unit: str) -> int: ...
    def session(self) -> contextlib.AbstractContextManager: ...
    def unit(self, tasks: Sequence[Task]) -> contextlib.AbstractContextManager[Answerer]: ...


# ------------------------------------------------------------------------------------------------ answering
def answer_unit(ans: Answerer, tasks: Sequence[Task], bb: LoadedBackbone, *, reduction: str, rank_batch_size: int,
                stats: UnitStats, on_batch: OnBatch = None) -> list[dict[str, Any]]:
    """One row per instance of `tasks`, in order: rank classification for tasks with answer choices, greedy
    decoding (all the unit's other tasks batched together by length) for the rest."""
    out: list[Optional[list[dict]]] = [None] * len(tasks)
    gen = [ti for ti, t in enumerate(tasks) if not has_answer_choices(t)]
    if gen:
        srcs = {ti: ans.sources(ti) for ti in gen}
        rows = [s for ti in gen for s in srcs[ti]]
        texts = iter(ans.generate(rows, [ti for ti in gen for _ in srcs[ti]], stats.decode, on_batch))
        for ti in gen:
            out[ti] = [{"task": tasks[ti].name, "id": inst.id, "prediction": next(texts)}
                       for inst in tasks[ti].instances]
    pad = pad_id(bb.tokenizer)
    for ti, task in enumerate(tasks):
        if out[ti] is not None:
            continue
        res = rank_classify_ids(ans.forward(ti), bb.arch, bb.tokenizer, task, ans.sources(ti), pad, reduction,
                                rank_batch_size, device=bb.device, on_batch=on_batch)
        stats.rank_classified += len(task.instances)
        stats.forwarded_tokens += res.forwarded_tokens
        out[ti] = [{"task": task.name, "id": inst.id, "prediction": inst.answer_choices[p], "choice": p, "label": y,
                    "scores": [round(s, 6) for s in sc]}
                   for inst, p, y, sc in zip(task.instances, res.predictions, res.labels, res.scores)]
    return [row for rows in out for row in rows]


def _plain_answerer(model, bb: LoadedBackbone, cfg: Any, tasks: Sequence[Task], with_instruction: bool = True,
                    hooks: Optional[BatchedLoraHooks] = None, adapters=None,
                    slot_of_task: Optional[Sequence[int]] = None) -> Answerer:
    """A backbone reading full prompts (or instance parts): no_ft, the merged baselines, the teachers (hooks with
    adapters stacked per slot; slot_of_task[i] = task i's teacher)."""
    settings = prompt_settings(cfg, bb.arch)
    e = cfg.eval

    def sources(ti: int) -> list[list[int]]:
        return [source_ids(tasks[ti], inst, bb.tokenizer, settings, with_instruction) for inst in tasks[ti].instances]

    def generate(rows, task_of_row, stats, on_batch):
        slots = None if hooks is None else [slot_of_task[ti] for ti in task_of_row]
        return decode_prompts(model, bb.tokenizer, bb.arch, rows, device=bb.device, max_new_tokens=e.max_new_tokens,
                              batch_size=e.batch_size, hooks=hooks, adapters=adapters, row_unit=slots, stats=stats,
                              on_batch=on_batch)

    def forward(ti: int) -> ForwardFn:
        plain = module_forward(model, bb.arch)
        if hooks is None:
            return plain

        def with_teacher(input_ids, attention_mask, labels):
            slot = torch.full((input_ids.shape[0],), slot_of_task[ti], dtype=torch.long, device=input_ids.device)
            with hooks.apply(adapters, slot):
                return plain(input_ids, attention_mask, labels)
        return with_teacher

    return Answerer(sources, generate, forward)


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class NoFinetune:
    cfg: Any
    bb: LoadedBackbone
    name: str = "no_ft"

    def answers(self, split: str) -> bool:
        return True

    def artifacts(self) -> list[Path]:
        return []

    def unit_of(self):
        return None

    def unit_bytes(self, unit: str) -> int:
        return 0

    def session(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unit(self, tasks: Sequence[Task]) -> Iterator[Answerer]:
        yield _plain_answerer(self.bb.model, self.bb, self.cfg, tasks)


def merged_lora(model: torch.nn.Module, specs: Sequence, adapters: dict, scale: float):
    """modeling.lora.merged_in_place for a baseline's LoRA (weights restored bit for bit on exit)."""
    return merged_in_place(model, specs, adapters, scale, what="the baseline LoRA")


@dataclass
class Baseline:
    cfg: Any
    bb: LoadedBackbone
    name: str
    folder: Path

    def answers(self, split: str) -> bool:
        return True

    def artifacts(self) -> list[Path]:
        return [self.folder / ADAPTER_CONFIG, self.folder / ADAPTER_WEIGHTS]

    def unit_of(self):
        return None

    def unit_bytes(self, unit: str) -> int:
        return 0

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        acfg = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        for flag in ("use_dora", "use_rslora"):
            if acfg.get(flag):
                raise ArtifactMismatchError(f"{self.folder / ADAPTER_CONFIG}: {flag}=true; the evaluation merges plain "
                                            f"LoRA (W + alpha/r * B A) only")
        adapters, scale, _ = read_peft_adapter(self.folder, self.bb.specs, device="cpu")
        with merged_lora(self.bb.model, self.bb.specs, adapters, scale):
            yield

    @contextlib.contextmanager
    def unit(self, tasks: Sequence[Task]) -> Iterator[Answerer]:
        yield _plain_answerer(self.bb.model, self.bb, self.cfg, tasks, with_instruction=self.name == "tk_instruct")


@dataclass
class Teachers:
    cfg: Any
    bb: LoadedBackbone
    units: list[str]                 # the seen split's teacher units
    name: str = "teacher"

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.cfg)

    def answers(self, split: str) -> bool:
        return split == "seen"

    def artifacts(self) -> list[Path]:
        return [self.paths.teacher(u) / ADAPTER_WEIGHTS for u in self.units]

    def unit_of(self) -> Callable[[Task], str]:
        return lambda task: teacher_unit(task, self.cfg.teacher.group_by)

    def unit_bytes(self, unit: str) -> int:
        return (self.paths.teacher(unit) / ADAPTER_WEIGHTS).stat().st_size

    def session(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unit(self, tasks: Sequence[Task]) -> Iterator[Answerer]:
        """Only this unit's teachers on the device (stacked on the host, then moved: one device copy)."""
        unit_of = self.unit_of()
        names = sorted({unit_of(t) for t in tasks})
        loaded = [read_peft_adapter(self.paths.teacher(u), self.bb.specs, device="cpu") for u in names]
        scales = {round(s, 8) for _, s, _ in loaded}
        if len(scales) != 1:
            raise ArtifactMismatchError(f"{self.paths.teachers}: teachers {names} have different LoRA scales "
                                        f"{sorted(scales)}")
        adapters = {mt: (torch.stack([a[mt][0] for a, _, _ in loaded]).to(self.bb.device),
                         torch.stack([a[mt][1] for a, _, _ in loaded]).to(self.bb.device)) for mt in loaded[0][0]}
        del loaded
        hooks = BatchedLoraHooks(self.bb.model, self.bb.specs, scales.pop())
        slot = {u: i for i, u in enumerate(names)}
        try:
            yield _plain_answerer(self.bb.model, self.bb, self.cfg, tasks, hooks=hooks, adapters=adapters,
                                  slot_of_task=[slot[unit_of(t)] for t in tasks])
        finally:
            hooks.remove()


@dataclass
class Hypernet:
    cfg: Any
    bb: LoadedBackbone
    name: str
    export: Path
    student: Any = None

    def answers(self, split: str) -> bool:
        return True

    def artifacts(self) -> list[Path]:
        return sorted(p for p in self.export.iterdir() if p.is_file())

    def unit_of(self):
        return None

    def unit_bytes(self, unit: str) -> int:
        return 0

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        # The student wraps the run's own backbone (its hooks removed on exit): never a second copy of the weights.
        self.student = load_student_from_export(self.export, backbone=self.bb.model, device=self.bb.device,
                                                backend=self.cfg.hypernet.kernel)
        try:
            yield
        finally:
            self.student.hooks.remove()
            self.student = None

    @contextlib.contextmanager
    def unit(self, tasks: Sequence[Task]) -> Iterator[Answerer]:
        """The unit's instruction states and adapters, computed once per task and held for the unit only."""
        st, bb, e = self.student, self.bb, self.cfg.eval
        settings = prompt_settings(self.cfg, bb.arch)
        with torch.no_grad():
            rows = [instruction_ids(t, bb.tokenizer, settings) for t in tasks]
            # widths in buckets, as training's: one shape per bucket, not per unit (collate.WIDTH_BUCKET)
            encoding = st.encode_instruction_rows(rows, pad_id(bb.tokenizer), bb.device,
                                                  width_multiple=WIDTH_BUCKET).to(bb.device)
            adapters = st.generate_adapters(encoding)

        def sources(ti: int) -> list[list[int]]:
            # LLaMA with fusion: the input continues the instruction prefix, so no second bos (as in training)
            return [encode_student_input(bb.tokenizer, build_task_input(inst), settings.max_input_length, st.fusion)
                    for inst in tasks[ti].instances]

        def generate(rows, task_of_row, stats, on_batch):
            return decode_student(st, bb.tokenizer, encoding, adapters, rows, task_of_row, device=bb.device,
                                  max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, stats=stats,
                                  on_batch=on_batch)

        def forward(ti: int) -> ForwardFn:
            def student_forward(input_ids, attention_mask, labels):
                task_ids = torch.full((input_ids.shape[0],), ti, dtype=torch.long, device=input_ids.device)
                if bb.arch == "t5":  # decoder inputs from the labels (-100 → pad), no loss computed
                    dec = st.backbone._shift_right(labels)
                    return st(encoding, task_ids, input_ids, attention_mask, decoder_input_ids=dec,
                              adapters=adapters).logits
                return st(encoding, task_ids, input_ids, attention_mask, adapters=adapters).logits
            return student_forward

        yield Answerer(sources, generate, forward)


# ------------------------------------------------------------------------------------------------ lookup
def build_method(cfg: Any, method: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                 log: Log = print) -> Optional[Method]:
    """The method object, or None (logged) when the folder it reads is missing: it then has no numbers. Cheap: the
    weights are read in `session()` / `unit()`."""
    paths = RunPaths.of(cfg)
    if method == "no_ft":
        return NoFinetune(cfg, bb)
    if method in BASELINES:
        folder = paths.baseline(method)
        if not (folder / ADAPTER_CONFIG).is_file():
            log(f"evaluate: {method}: no trained baseline at {folder} (run the `baselines` stage); no numbers")
            return None
        return Baseline(cfg, bb, method, folder)
    if method == "teacher":
        seen = splits.get("seen") or []
        units = sorted({teacher_unit(t, cfg.teacher.group_by) for t in seen})
        missing = [u for u in units if not (paths.teacher(u) / ADAPTER_CONFIG).is_file()]
        if not seen or missing:
            if missing:
                log(f"evaluate: teacher: no published teacher for {len(missing)} unit(s) (e.g. {missing[0]}); "
                    f"no teacher numbers")
            return None
        return Teachers(cfg, bb, units)
    if method in HYPERNET_METHODS:
        export = paths.finetune_export(method)
        if not (export / EXPORT_CONFIG).is_file():
            log(f"evaluate: {method}: no export at {export} (run the pipeline's finetune stage); no numbers")
            return None
        return Hypernet(cfg, bb, method, export)
    raise ConfigError(f"eval.methods: unknown method {method!r}; expected some of {list(ALL_METHODS)}")


# ------------------------------------------------------------------------------------------------ one process
def method_units(cfg: Any, method: Method, tasks: Sequence[Task]) -> list[list[int]]:
    """The split's work units for `method` (eval/shards.py: the same for any number of shards)."""
    from .shards import work_units

    e = cfg.eval
    unit_of = method.unit_of()
    return work_units(tasks, e.tasks_per_batch, unit_of, method.unit_bytes if unit_of else None,
                      e.teacher_group_bytes if unit_of else None)


def answer_tasks(cfg: Any, method: Method, tasks: Sequence[Task], units: Sequence[Sequence[int]],
                 bb: LoadedBackbone, stats: UnitStats, on_batch: OnBatch = None) -> list[dict[str, Any]]:
    """Rows of the tasks in `units` (in unit order), unit by unit, inside an open `method.session()`."""
    rows: list[dict[str, Any]] = []
    for unit in units:
        unit_tasks = [tasks[i] for i in unit]
        with method.unit(unit_tasks) as ans:
            rows += answer_unit(ans, unit_tasks, bb, reduction=cfg.eval.rank_classification,
                                rank_batch_size=cfg.eval.rank_batch_size, stats=stats, on_batch=on_batch)
    return rows


@dataclass
class MethodPredictions:
    """Predictions per split (None: the method has no number there) and the seconds spent producing them."""

    by_split: dict[str, Optional[list[str]]]
    seconds: float
    instances: int


def predict_method(cfg: Any, method: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                   log: Log = print) -> MethodPredictions:
    """Every split of one method in this process, unsharded (tests and tools; the stage shards the same units)."""
    import time

    m = build_method(cfg, method, splits, bb, log)
    out: dict[str, Optional[list[str]]] = {s: None for s in splits}
    if m is None:
        return MethodPredictions(out, 0.0, 0)
    t0, n = time.perf_counter(), 0
    with m.session():
        for split, tasks in splits.items():
            if m.answers(split) and tasks:
                rows = answer_tasks(cfg, m, tasks, method_units(cfg, m, tasks), bb, UnitStats())
                out[split] = [r["prediction"] for r in rows]
                n += len(rows)
    return MethodPredictions(out, time.perf_counter() - t0, n)


def predict_baseline(cfg: Any, mode: str, splits: dict[str, list[Task]], bb: LoadedBackbone,
                     log: Log = print) -> MethodPredictions:
    if mode not in BASELINES:
        raise ConfigError(f"baselines: unknown mode {mode!r}; expected one of {list(BASELINES)}")
    return predict_method(cfg, mode, splits, bb, log)
