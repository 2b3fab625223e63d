"""Rank classification (P3 / T0 evaluation): score every answer choice, predict the most likely one.

The score of a choice is the log-likelihood of its target tokens given the source, reduced per choice:
- `reduction="mean"` (default): per-token mean, as the official TAGI code scores P3 (Xnhyacinth/TAGI
  src/p3_trainer.py `prediction_step`: `label_smoothed_nll_loss(..., epsilon=0, average='instance')`, "per-instance
  token-avg loss", the lowest loss wins; HINT's code, which TAGI's P3 trainer follows, does the same).
- `reduction="sum"`: the summed log-likelihood, as bigscience/t-zero's evaluation does (t0/model.py sums
  `seq_token_log_probs`). The two disagree whenever choices differ in length.
Tokens:
- T5 ("t5"): the encoder reads the source, the decoder scores the choice tokens *including the closing </s>*
  (T0 and TAGI tokenise targets with the tokenizer's default special tokens, which appends eos).
- causal ("llama"): the model reads source + choice; only the choice positions are scored (no eos unless asked).
  Source and choice are tokenised apart and concatenated, so a choice's tokens never depend on the source.
Batching: all choices of `batch_size` instances go through one forward (rows = their choices, right-padded to a
width bucket, collate.WIDTH_BUCKET for sources and causal rows, TARGET_BUCKET for T5's short choice targets: few
distinct shapes, so the CPU kernel caches stay bounded whatever the number of tasks; issue #17).

Reporting, as TAGI's `compute_p3_metrics` aggregates: accuracy per prompt; per dataset the mean and the median over
its prompts; overall the mean of the dataset means and the *median of the dataset medians* (`t0_report`).

The core is model-agnostic: `make_score_fn(forward, arch)` turns any `forward(input_ids, attention_mask, labels) ->
logits` (a HF model, or the TAGI student with its generated adapter) into a `score_fn(batch) -> (token_logprobs,
mask)`; `choice_logliks` only encodes, batches and reduces. The evaluation stage (eval/methods.py) calls
`rank_classify_ids` once per task with that task's forward and the source ids of the run's one prompt encoder (the
tokens the method also generates from), and `t0_report` on the merged results.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from tagi_ds.data.collate import WIDTH_BUCKET, bucket_width
from tagi_ds.data.collate import pad_id as tokenizer_pad_id
from tagi_ds.data.p3 import T0_HELDOUT
from tagi_ds.data.tasks import Instance, Task
from tagi_ds.errors import ConfigError, DataError

Arch = Literal["t5", "llama"]
Reduction = Literal["mean", "sum"]
IGNORE = -100
HELDOUT_DATASETS = tuple(d.name for d in T0_HELDOUT)  # T0's held-out evaluation (MTest11), report order
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TARGET_BUCKET = 8  # T5 choice targets are a few tokens: a 64-token bucket would multiply the decoder's work


@dataclass
class ScoreBatch:
    input_ids: torch.Tensor       # (B, S) T5: source; causal: source + choice
    attention_mask: torch.Tensor  # (B, S)
    labels: torch.Tensor          # (B, T) T5: choice (+eos); causal: (B, S) choice ids at choice positions, else -100


ScoreFn = Callable[[ScoreBatch], "tuple[torch.Tensor, torch.Tensor]"]


def _check_arch(arch: str) -> None:
    if arch not in ("t5", "llama"):
        raise ConfigError(f"rank classification: arch must be 't5' or 'llama' (causal), got {arch!r}")


def module_forward(model: torch.nn.Module, arch: Arch) -> ForwardFn:
    """A HF model as a ForwardFn. T5 builds decoder inputs from the labels (shift right, -100 → pad)."""
    _check_arch(arch)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if arch == "t5":
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits  # (B, T, V)
        return model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, S, V)

    return forward


def make_score_fn(forward: ForwardFn, arch: Arch) -> ScoreFn:
    """Wrap a ForwardFn: returns (token log-probs of the labels, 0 where ignored; mask of scored positions)."""
    _check_arch(arch)

    def score(batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(batch.input_ids, batch.attention_mask, batch.labels)
        labels = batch.labels
        if arch == "llama":  # position t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        if logits.shape[:2] != labels.shape:
            raise ConfigError(f"rank classification: forward returned logits {tuple(logits.shape)} that do not "
                              f"line up with labels {tuple(labels.shape)} for arch {arch!r}")
        logp = F.log_softmax(logits.float(), dim=-1)                               # (B, T, V)
        mask = labels != IGNORE                                                   # (B, T)
        tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)      # (B, T)
        return tok * mask, mask

    return score


# ------------------------------------------------------------------------------------------------ encoding
def encode_pairs(arch: Arch, tokenizer: Any, sources: Sequence[str], choices: Sequence[Sequence[str]],
                 max_source_len: Optional[int] = None, add_eos: Optional[bool] = None
                 ) -> list[list[tuple[list[int], list[int]]]]:
    """Token ids per instance per choice: [(source_ids, choice_ids), …].

    add_eos: append eos to the choice (default: True for T5, as T0 does; False for causal models).
    A long causal source keeps its last max_source_len tokens (the question sits at the end of P3 prompts).
    """
    _check_arch(arch)
    if len(sources) != len(choices):
        raise DataError(f"rank classification: {len(sources)} sources but {len(choices)} answer-choice lists")
    eos = tokenizer.eos_token_id
    source_ids = []
    for src in sources:
        if arch == "t5":
            s_ids = list(tokenizer(src).input_ids)  # ends with </s>
            if max_source_len and len(s_ids) > max_source_len:  # keep the head, and the closing </s> if any
                ends_eos = eos is not None and s_ids[-1] == eos
                s_ids = s_ids[: max_source_len - 1] + [eos] if ends_eos else s_ids[:max_source_len]
        else:
            s_ids = list(tokenizer(src).input_ids)  # starts with <s> when the tokenizer adds it
            if max_source_len and len(s_ids) > max_source_len:
                s_ids = s_ids[-max_source_len:]
        source_ids.append(s_ids)
    return encode_choices(arch, tokenizer, source_ids, choices, add_eos)


def encode_choices(arch: Arch, tokenizer: Any, source_ids: Sequence[Sequence[int]],
                   choices: Sequence[Sequence[str]], add_eos: Optional[bool] = None
                   ) -> list[list[tuple[list[int], list[int]]]]:
    """Like `encode_pairs` for sources already tokenized (the evaluation passes the ids of the run's one prompt
    encoder, so a method scores choices after exactly the tokens it generates from); only the choices are encoded
    here, apart from the source (a choice's tokens never depend on its source)."""
    _check_arch(arch)
    if len(source_ids) != len(choices):
        raise DataError(f"rank classification: {len(source_ids)} sources but {len(choices)} answer-choice lists")
    add_eos = (arch == "t5") if add_eos is None else add_eos
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ConfigError("rank classification: add_eos needs a tokenizer with an eos token")
    out = []
    for i, (s_ids, chs) in enumerate(zip(source_ids, choices)):
        if not chs:
            raise DataError(f"rank classification: instance {i} has no answer choices")
        pairs = []
        for c in chs:
            c_ids = list(tokenizer(c, add_special_tokens=False).input_ids)
            if add_eos:
                c_ids.append(eos)
            if not c_ids:
                raise DataError(f"rank classification: instance {i} answer choice {c!r} encodes to no tokens")
            pairs.append((list(s_ids), c_ids))
        out.append(pairs)
    return out


def collate_pairs(arch: Arch, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                  device: Any = "cpu", buckets: bool = True) -> ScoreBatch:
    """Right-padded batch; padding is masked out (attention) and ignored (labels). `buckets`: widths rounded up
    (module docstring), else the longest row's."""
    _check_arch(arch)
    b = len(pairs)
    src_m, tgt_m = (WIDTH_BUCKET, TARGET_BUCKET) if buckets else (1, 1)
    if arch == "t5":
        s_len = bucket_width(max(len(s) for s, _ in pairs), src_m)
        t_len = bucket_width(max(len(c) for _, c in pairs), tgt_m)
        ids = torch.full((b, s_len), pad_id, dtype=torch.long)
        att = torch.zeros((b, s_len), dtype=torch.long)
        lab = torch.full((b, t_len), IGNORE, dtype=torch.long)
        for j, (s, c) in enumerate(pairs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
            lab[j, : len(c)] = torch.tensor(c)
    else:
        l_len = bucket_width(max(len(s) + len(c) for s, c in pairs), src_m)
        ids = torch.full((b, l_len), pad_id, dtype=torch.long)
        att = torch.zeros((b, l_len), dtype=torch.long)
        lab = torch.full((b, l_len), IGNORE, dtype=torch.long)
        for j, (s, c) in enumerate(pairs):
            n = len(s) + len(c)
            ids[j, :n] = torch.tensor(s + c)
            att[j, :n] = 1
            lab[j, len(s): n] = torch.tensor(c)
    return ScoreBatch(ids.to(device), att.to(device), lab.to(device))


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_encoded(score_fn: ScoreFn, arch: Arch, encoded: Sequence[Sequence[tuple[list[int], list[int]]]],
                  pad_id: int, reduction: Reduction = "mean", batch_size: int = 8,
                  device: Any = "cpu", on_batch: Optional[Callable[[int], None]] = None) -> list[list[float]]:
    """Log-likelihood of every (source, choice) pair; same nesting as `encoded`. One forward per `batch_size`
    instances, holding all their choices (an instance's choices are never split across forwards); `on_batch(n)`
    after each forward of n instances (progress)."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"rank classification: reduction must be 'sum' or 'mean', got {reduction!r}")
    if batch_size < 1:
        raise ConfigError(f"rank classification: batch_size must be ≥ 1, got {batch_size}")
    out: list[list[float]] = []
    for k in range(0, len(encoded), batch_size):
        group = encoded[k: k + batch_size]
        tok, mask = score_fn(collate_pairs(arch, [p for pairs in group for p in pairs], pad_id, device))
        total = tok.sum(-1)                                    # (sum of choices,)
        if reduction == "mean":
            total = total / mask.sum(-1).clamp_min(1)
        flat = total.tolist()
        for pairs in group:
            out.append(flat[: len(pairs)])
            flat = flat[len(pairs):]
        if on_batch is not None:
            on_batch(len(group))
    return out


def _device_of(model: Any, device: Any) -> Any:
    if device is not None:
        return device
    if isinstance(model, torch.nn.Module):
        with_params = next(model.parameters(), None)
        if with_params is not None:
            return with_params.device
    return "cpu"


def choice_logliks(model: torch.nn.Module | ForwardFn, arch: Arch, tokenizer: Any, sources: Sequence[str],
                   choices: Sequence[Sequence[str]], reduction: Reduction = "mean",
                   batch_size: int = 8, max_source_len: Optional[int] = None, add_eos: Optional[bool] = None,
                   device: Any = None) -> list[list[float]]:
    """Per-token mean (or summed) log-likelihood of each answer choice given its source; `batch_size` instances
    (all their choices) per forward.

    model: a HF model (nn.Module), or any `forward(input_ids, attention_mask, labels) -> logits` callable
    (T5: logits (B, T, V) over the labels; causal: logits (B, S, V) over input_ids).
    """
    _check_arch(arch)
    forward = module_forward(model, arch) if isinstance(model, torch.nn.Module) else model
    if not callable(forward):
        raise ConfigError(f"rank classification: model must be an nn.Module or a forward callable, "
                          f"got {type(model).__name__}")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()  # dropout would make the scores random
    try:
        encoded = encode_pairs(arch, tokenizer, sources, choices, max_source_len, add_eos)
        return score_encoded(make_score_fn(forward, arch), arch, encoded, tokenizer_pad_id(tokenizer), reduction,
                             batch_size, _device_of(model, device))
    finally:
        if was_training:
            model.train()


def argmax_choices(logliks: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best choice per instance (the first one on ties)."""
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in logliks]


def rank_classify(model: torch.nn.Module | ForwardFn, arch: Arch, tokenizer: Any, sources: Sequence[str],
                  choices: Sequence[Sequence[str]], **kwargs: Any) -> list[int]:
    """Predicted choice index per instance (kwargs as in `choice_logliks`)."""
    return argmax_choices(choice_logliks(model, arch, tokenizer, sources, choices, **kwargs))


# ------------------------------------------------------------------------------------------- tasks and report
@dataclass
class PromptResult:
    """Rank classification of one P3 task (one dataset-prompt)."""

    task: str
    dataset: str
    prompt: str
    predictions: list[int]
    labels: list[int]
    scores: list[list[float]] = field(default_factory=list, repr=False)
    forwarded_tokens: int = 0  # source + choice tokens of every (instance, choice) row scored (throughput)

    @property
    def accuracy(self) -> float:
        return 100.0 * sum(p == y for p, y in zip(self.predictions, self.labels)) / max(len(self.labels), 1)


def answer_index(task_name: str, inst: Instance) -> int:
    """Index of the instance's target among its answer choices (P3's target is one of them, up to spaces)."""
    if not inst.answer_choices:
        raise DataError(f"task '{task_name}' instance {inst.id}: no answer choices, cannot rank-classify")
    target = inst.references[0].strip()
    for j, c in enumerate(inst.answer_choices):
        if c.strip() == target:
            return j
    raise DataError(f"task '{task_name}' instance {inst.id}: target {target!r} is none of its answer choices "
                    f"{list(inst.answer_choices)}")


def rank_classify_task(model: torch.nn.Module | ForwardFn, arch: Arch, tokenizer: Any, task: Task,
                       sources: Sequence[str], reduction: Reduction = "mean", batch_size: int = 8,
                       max_source_len: Optional[int] = None, add_eos: Optional[bool] = None,
                       device: Any = None) -> PromptResult:
    """Rank-classify every instance of `task`. `sources[i]` is what the model reads for instance i (the student's
    backbone input, or a baseline's full prompt: the caller builds it); `model` is that task's model or forward."""
    if len(sources) != len(task.instances):
        raise DataError(f"task '{task.name}': {len(sources)} sources for {len(task.instances)} instances")
    labels = [answer_index(task.name, inst) for inst in task.instances]
    scores = choice_logliks(model, arch, tokenizer, sources, [list(i.answer_choices) for i in task.instances],
                            reduction, batch_size, max_source_len, add_eos, device)
    return PromptResult(task.name, str(task.meta.get("dataset", task.name)), str(task.meta.get("prompt", task.name)),
                        argmax_choices(scores), labels, scores)


def rank_classify_ids(forward: ForwardFn, arch: Arch, tokenizer: Any, task: Task, source_ids: Sequence[Sequence[int]],
                      pad_id: int, reduction: Reduction = "mean", batch_size: int = 8, add_eos: Optional[bool] = None,
                      device: Any = "cpu", on_batch: Optional[Callable[[int], None]] = None) -> PromptResult:
    """`rank_classify_task` for sources already tokenized (`source_ids[i]`: what the model reads for instance i) and
    a forward callable: the evaluation's one path for every method (a HF model through `module_forward`, a teacher
    through its hooks, the TAGI student through a closure holding its task's adapter and instruction states)."""
    if len(source_ids) != len(task.instances):
        raise DataError(f"task '{task.name}': {len(source_ids)} sources for {len(task.instances)} instances")
    labels = [answer_index(task.name, inst) for inst in task.instances]
    encoded = encode_choices(arch, tokenizer, source_ids, [list(i.answer_choices) for i in task.instances], add_eos)
    scores = score_encoded(make_score_fn(forward, arch), arch, encoded, pad_id, reduction, batch_size, device,
                           on_batch)
    tokens = sum(len(s) + len(c) for pairs in encoded for s, c in pairs)
    return PromptResult(task.name, str(task.meta.get("dataset", task.name)), str(task.meta.get("prompt", task.name)),
                        argmax_choices(scores), labels, scores, tokens)


def has_answer_choices(task: Task) -> bool:
    """A task is rank-classified when every instance carries answer choices (P3's classification prompts)."""
    return bool(task.instances) and all(inst.answer_choices for inst in task.instances)


def aggregate_prompt_accuracies(accuracy: Mapping[tuple[str, str], float]) -> dict[str, Any]:
    """{(dataset, prompt): accuracy} → {"datasets": {ds: {"prompts": {p: acc}, "mean", "median"}}, "mean": mean of
    the dataset means, "median": median of the dataset medians (TAGI's aggregate), "mean_of_medians": the mean of
    the dataset medians (what some papers average instead; reported so the two are never confused)}."""
    if not accuracy:
        raise DataError("accuracy: no prompts to aggregate")
    by_ds: dict[str, dict[str, float]] = {}
    for (ds, prompt), acc in accuracy.items():
        by_ds.setdefault(ds, {})[prompt] = float(acc)
    order = [d for d in HELDOUT_DATASETS if d in by_ds] + sorted(d for d in by_ds if d not in HELDOUT_DATASETS)
    per_ds = {ds: {"prompts": by_ds[ds], "mean": statistics.fmean(by_ds[ds].values()),
                   "median": statistics.median(by_ds[ds].values())} for ds in order}
    medians = [d["median"] for d in per_ds.values()]
    return {"datasets": per_ds,
            "mean": statistics.fmean(d["mean"] for d in per_ds.values()),
            "median": statistics.median(medians),
            "mean_of_medians": statistics.fmean(medians)}


def accuracy_per_prompt_then_dataset(predictions: Sequence[int], labels: Sequence[int], prompts: Sequence[str],
                                     datasets: Sequence[str]) -> dict[str, Any]:
    """Accuracy (×100) per (dataset, prompt) from flat per-instance lists, aggregated by
    `aggregate_prompt_accuracies`."""
    if not (len(predictions) == len(labels) == len(prompts) == len(datasets)):
        raise DataError(f"accuracy: lengths differ (predictions {len(predictions)}, labels {len(labels)}, "
                        f"prompts {len(prompts)}, datasets {len(datasets)})")
    if not predictions:
        raise DataError("accuracy: no predictions")
    hits: dict[tuple[str, str], list[int]] = {}
    for p, y, pr, ds in zip(predictions, labels, prompts, datasets):
        hits.setdefault((ds, pr), []).append(int(p == y))
    return aggregate_prompt_accuracies({k: 100.0 * sum(h) / len(h) for k, h in hits.items()})


def t0_report(results: Sequence[PromptResult]) -> dict[str, Any]:
    """The P3 held-out report: `aggregate_prompt_accuracies` over the tasks' accuracies, plus "missing": the T0
    held-out datasets (ANLI R1-R3, CB, RTE, WSC, Winogrande, COPA, HellaSwag, StoryCloze, WiC) with no result."""
    keys = [(r.dataset, r.prompt) for r in results]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise DataError(f"t0_report: a (dataset, prompt) appears twice: {twice}")
    report = aggregate_prompt_accuracies({(r.dataset, r.prompt): r.accuracy for r in results})
    report["missing"] = [d for d in HELDOUT_DATASETS if d not in report["datasets"]]
    return report
