"""A length summary of the run's data: task and instance counts and token lengths, per split (seconds, not minutes).

What the byte formulas need from the data:
- counts: training tasks (the O(tasks) structures), teacher units (tasks or first categories), instances per split;
- the widest instruction (capped at data.max_source_length; a micro batch pads its own instructions to an
  8-token bucket of its longest, so the widest batch is this rounded up) and the widest full prompt / student
  input / target a batch can hold (the worst batch is what fits or not);
- mean lengths (time and disk estimates): label tokens per instance (logit cache rows), prompt tokens (FLOPs).

Where the data is on disk it is read with the stages' own loaders (`data.registry`) and the prompt builders
(`data.prompts`). Token lengths come from the run's tokenizer when the backbone folder is local; otherwise (a hub id
with no local copy) from characters at CHARS_PER_TOKEN, an assumption the summary names. Full prompts, inputs and
targets are measured on the first SAMPLE_PER_TASK instances of each task (instructions on every task).
When the data is absent, documented reference figures stand in (`ASSUMED`), and `how` says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

CHARS_PER_TOKEN = 4.0  # English prose in a 32k SentencePiece vocabulary (T5 / LLaMA-2): an assumption, not measured
SAMPLE_PER_TASK = 3

# Reference figures when the data is not on disk. SNI: the official English default split (756 / 119 tasks);
# lengths measured in characters on the 687-task subset at /work/shared/data/sni (instruction Def + 2 Pos: mean
# 942 chars, 0.7% over 4,096; full prompt mean 1,235 chars; instance part 288; label 24; 60 train categories).
# P3: T0's 35 training datasets at ~8.6 prompts each, MTest11's 116 held-out prompts; lengths are guesses (16
# templated demonstrations fill any instruction cap; inputs at half the cap).
ASSUMED = {
    "sni": {"train_tasks": 756, "test_tasks": 119, "categories": 60, "instr_chars": 942.0, "full_chars": 1235.0,
            "input_chars": 288.0, "target_chars": 24.0, "instr_reaches_cap": True},
    "p3": {"train_tasks": 300, "test_tasks": 116, "categories": 8, "instr_chars": None, "full_chars": None,
           "input_chars": None, "target_chars": 24.0, "instr_reaches_cap": True},
}


@dataclass
class SplitFacts:
    tasks: int
    instances: int
    instr_mean: float  # tokens of one task's instruction (after the cap)
    instr_width: int  # the split's longest instruction (capped): the widest micro batch's bucket rounds it up
    prompt_mean: float  # full Tk-Instruct prompt (teacher, cache, tk_instruct, no_ft), capped
    prompt_width: int  # widest full prompt a batch can hold
    input_mean: float  # student backbone input (instance part), capped at max_input_length
    input_width: int
    target_mean: float  # label tokens incl. eos, capped at max_target_length
    target_width: int
    chars_per_instance: float  # instance text held in memory (input + references)


@dataclass
class DataFacts:
    source: str
    splits: dict[str, SplitFacts]
    teacher_units: int  # teacher.group_by units among the training tasks
    pretrain: PretrainFacts
    how: str  # where the numbers come from: measured with a tokenizer, from characters, or assumed
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ measuring
def _token_counter(tokenizer: Any) -> tuple[Callable[[str], int], Any]:
    if tokenizer is not None:
        return (lambda text: len(tokenizer(text)["input_ids"])), tokenizer
    return (lambda text: int(len(text) / CHARS_PER_TOKEN) + 1), None


def _split_facts(tasks: list, settings: Any, tokenizer: Any, memo: dict) -> SplitFacts:
    """`memo` keeps per-task and per-instance lengths across splits (the seen split reuses the training tasks)."""
    from ..data.collate import encode_target, instruction_ids
    from ..data.prompts import build_instruction, build_source, build_task_input

    count, tok = _token_counter(tokenizer)
    cap_src, cap_in, cap_tgt = settings.max_source_length, settings.max_input_length, settings.max_target_length

    def instr_len(t) -> int:
        if tok is not None:
            return len(instruction_ids(t, tok, settings))
        return min(cap_src, count(build_instruction(t, settings.num_pos, settings.add_definition, None, cap_src)))

    def inst_lens(t, inst) -> tuple[int, int, int]:
        src = build_source(t, inst, settings.num_pos, settings.add_definition, tok, cap_src)
        tgt = len(encode_target(tok, inst.label, cap_tgt)) if tok is not None else min(cap_tgt, count(inst.label) + 1)
        return min(cap_src, count(src)), min(cap_in, count(build_task_input(inst))), tgt

    for t in tasks:
        if ("instr", t.name) not in memo:
            memo[("instr", t.name)] = instr_len(t)
    instr = [memo[("instr", t.name)] for t in tasks]
    prompts, inputs, targets = [], [], []
    chars = n_inst = 0
    for t in tasks:
        for inst in t.instances:
            chars += len(inst.input) + sum(len(r) for r in inst.references)
            n_inst += 1
        for inst in t.instances[:SAMPLE_PER_TASK]:
            key = ("inst", t.name, inst.id)
            if key not in memo:
                memo[key] = inst_lens(t, inst)
            p, i, g = memo[key]
            prompts.append(p)
            inputs.append(i)
            targets.append(g)

    def mean(xs: list) -> float:
        return float(sum(xs) / len(xs)) if xs else 0.0

    return SplitFacts(tasks=len(tasks), instances=n_inst, instr_mean=mean(instr), instr_width=max(instr, default=0),
                      prompt_mean=mean(prompts), prompt_width=max(prompts, default=0), input_mean=mean(inputs),
                      input_width=max(inputs, default=0), target_mean=mean(targets),
                      target_width=max(targets, default=0), chars_per_instance=chars / max(1, n_inst))


def _settings(cfg: Any) -> Any:
    from ..data.collate import PromptSettings

    d = cfg.data
    return PromptSettings(arch="t5", num_pos=d.num_pos_examples, add_definition=d.add_task_definition,
                          max_source_length=d.max_source_length, max_input_length=d.max_input_length,
                          max_target_length=d.max_target_length, instruction_overflow="truncate")


def _load_tokenizer(cfg: Any, local_dir: Optional[str]) -> Any:
    path = cfg.backbone.tokenizer or local_dir
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _data_on_disk(cfg: Any) -> bool:
    d = cfg.data
    if d.source == "synthetic":
        return True
    root = d.sni_dir if d.source == "sni" else d.p3_dir
    return root is not None and Path(root).is_dir()


def _units(tasks: list, group_by: str) -> int:
    if group_by == "task":
        return len(tasks)
    return len({t.categories[0] for t in tasks if t.categories}) or len(tasks)


@dataclass
class PretrainFacts:
    docs: int
    chars_mean: float
    tokens_mean: float  # tokens of a whole document (tokenized when its block is read)
    instr_width: int  # segment a + the tokenizer's framing token (bucketed to 8 per training micro batch)
    input_width: int  # T5: segment b + eos; LLaMA: bos + b + c + eos (the causal sequence)
    target_width: int  # segment c + eos


def _pretrain_documents(cfg: Any, assumptions: list[str]) -> list[str]:
    d = cfg.data
    if not d.pretrain_text or d.pretrain_text == "offline":  # train/pretrain.py OFFLINE_TEXT
        from ..data.pretrain_text import OFFLINE_CORPORA

        return OFFLINE_CORPORA[d.pretrain_offline_corpus](d.pretrain_offline_docs, seed=d.seed)
    path = Path(d.pretrain_text)
    if path.is_file() and path.stat().st_size < 512 * 1024 ** 2:
        from ..data.pretrain_text import load_documents

        return load_documents(path)
    assumptions.append(f"pretrain documents: {d.pretrain_text} not read (absent or over 512 MiB); "
                       f"assumed data.pretrain_offline_docs={d.pretrain_offline_docs} documents of 1,000 characters")
    return ["x" * 1000] * int(d.pretrain_offline_docs)


def pretrain_facts(cfg: Any, tokenizer: Any, arch: str, assumptions: list[str]) -> PretrainFacts:
    """What `train/pretrain.py build_data` makes of the documents: every one tokenized and HINT-split (seeded as
    the stage seeds it), the instruction rows framed with bos (LLaMA) or eos (T5)."""
    import random

    from ..data.pretrain_text import hint_split

    docs = _pretrain_documents(cfg, assumptions)
    la, lb, lc = (int(x) for x in cfg.data.pretrain_segment_lengths)
    chars = sum(len(x) for x in docs) / max(1, len(docs))
    if tokenizer is None:
        toks = chars / CHARS_PER_TOKEN
        longest = max((len(x) for x in docs), default=0) / CHARS_PER_TOKEN
        a = int(min(la, max(1, longest - 2)))
        b, c = lb, lc
    else:
        rng = random.Random(f"pretrain_split:{cfg.data.seed}")
        a = b = c = 0
        total = 0
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            total += len(ids)
            if len(ids) >= 3:
                sa, sb, sc = hint_split(ids, (la, lb, lc), rng)
                a, b, c = max(a, len(sa)), max(b, len(sb)), max(c, len(sc))
        toks = total / max(1, len(docs))
    inp = b + 1 if arch == "t5" else b + c + 2
    return PretrainFacts(len(docs), chars, toks, a + 1, inp, c + 1)


def data_facts(cfg: Any, local_dir: Optional[str] = None, arch: str = "t5") -> DataFacts:
    """Counts and token lengths of the run's splits (see the module docstring)."""
    import warnings

    from ..data.registry import load_run_tasks_from_config

    assumptions: list[str] = []
    settings = _settings(cfg)
    tok = _load_tokenizer(cfg, local_dir)
    pre = pretrain_facts(cfg, tok, arch, assumptions)
    if _data_on_disk(cfg):
        how = (f"measured: {cfg.data.source} data read with the stages' loaders, tokens counted with "
               f"{cfg.backbone.tokenizer or local_dir}" if tok is not None else
               f"{cfg.data.source} data read with the stages' loaders; tokens estimated from characters at "
               f"{CHARS_PER_TOKEN} chars/token (no local tokenizer for {cfg.backbone.name_or_path})")
        if tok is None:
            assumptions.append(f"tokens = characters / {CHARS_PER_TOKEN} (the backbone's tokenizer is not on disk)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # instruction_ids warns once per over-long instruction
            splits = load_run_tasks_from_config(cfg)
            memo: dict = {}
            facts = {k: _split_facts(v, settings, tok, memo) for k, v in splits.items()}
        return DataFacts(cfg.data.source, facts, _units(splits["train"], cfg.teacher.group_by), pre, how,
                         assumptions)
    return _assumed(cfg, pre, assumptions)


def _assumed(cfg: Any, pre: PretrainFacts, assumptions: list[str]) -> DataFacts:
    d = cfg.data
    ref = ASSUMED.get(d.source)
    if ref is None:  # synthetic data is generated, never absent
        raise ValueError(f"no reference figures for data.source={d.source!r}")
    root = d.sni_dir if d.source == "sni" else d.p3_dir
    assumptions.append(f"{d.source} data not found at {root!r}: reference figures stand in (tagi_ds/plan/"
                       f"data_summary.py ASSUMED); give data.{d.source}_dir=<folder> for real lengths")

    def tok(chars: Optional[float], cap: int) -> float:
        return min(float(cap), chars / CHARS_PER_TOKEN + 1) if chars is not None else cap / 2

    n_train = ref["train_tasks"] if d.max_tasks is None else min(ref["train_tasks"], d.max_tasks)
    per_train = d.max_instances_per_task
    per_eval = d.max_eval_instances_per_task

    def split(tasks: int, per_task: int) -> SplitFacts:
        return SplitFacts(tasks=tasks, instances=tasks * per_task,
                          instr_mean=tok(ref["instr_chars"], d.max_source_length),
                          instr_width=d.max_source_length if ref["instr_reaches_cap"] else
                          int(tok(ref["instr_chars"], d.max_source_length)),
                          prompt_mean=tok(ref["full_chars"], d.max_source_length), prompt_width=d.max_source_length,
                          input_mean=tok(ref["input_chars"], d.max_input_length), input_width=d.max_input_length,
                          target_mean=tok(ref["target_chars"], d.max_target_length), target_width=d.max_target_length,
                          chars_per_instance=(ref["input_chars"] or 4 * d.max_input_length) + 2 * ref["target_chars"])

    splits = {"train": split(n_train, per_train), "seen": split(n_train, min(per_train, per_eval)),
              "unseen": split(ref["test_tasks"], per_eval)}
    units = n_train if cfg.teacher.group_by == "task" else ref["categories"]
    assumptions.append(f"{d.source}: {n_train} train / {ref['test_tasks']} test tasks, every task at the instance "
                       f"caps, the widest instruction and prompt at data.max_source_length={d.max_source_length}")
    return DataFacts(d.source, splits, units, pre, f"assumed ({d.source} reference figures)", assumptions)
