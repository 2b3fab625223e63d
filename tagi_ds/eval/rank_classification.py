"""Rank classification (P3 / T0 evaluation): score every answer choice, predict the most likely one.

T0's recipe: the log-likelihood of a choice is the sum of its target tokens' log-probabilities given the source.
- T5 ("t5"): the encoder reads the source, the decoder scores the choice tokens *including the closing </s>*
  (T0 tokenises targets with the tokenizer's default special tokens, which appends eos).
- causal ("llama"): the model reads source + choice; only the choice positions are scored (no eos unless asked).
  Source and choice are tokenised apart and concatenated, so a choice's tokens never depend on the source.
`reduction="mean"` divides by the number of scored tokens (length-normalised variant).

The core is model-agnostic: `make_score_fn(forward, arch)` turns any `forward(input_ids, attention_mask, labels) ->
logits` (a HF model, or the TAGI student with its generated adapter) into a `score_fn(batch) -> (token_logprobs,
mask)`; `choice_logliks` only encodes, batches and reduces.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from tagi_ds.errors import ConfigError, DataError

Arch = Literal["t5", "llama"]
IGNORE = -100
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    add_eos = (arch == "t5") if add_eos is None else add_eos
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ConfigError("rank classification: add_eos needs a tokenizer with an eos token")
    out = []
    for i, (src, chs) in enumerate(zip(sources, choices)):
        if not chs:
            raise DataError(f"rank classification: instance {i} has no answer choices")
        if arch == "t5":
            s_ids = list(tokenizer(src).input_ids)  # ends with </s>
            if max_source_len and len(s_ids) > max_source_len:  # keep the head, and the closing </s> if any
                ends_eos = eos is not None and s_ids[-1] == eos
                s_ids = s_ids[: max_source_len - 1] + [eos] if ends_eos else s_ids[:max_source_len]
        else:
            s_ids = list(tokenizer(src).input_ids)  # starts with <s> when the tokenizer adds it
            if max_source_len and len(s_ids) > max_source_len:
                s_ids = s_ids[-max_source_len:]
        pairs = []
        for c in chs:
            c_ids = list(tokenizer(c, add_special_tokens=False).input_ids)
            if add_eos:
                c_ids.append(eos)
            if not c_ids:
                raise DataError(f"rank classification: instance {i} answer choice {c!r} encodes to no tokens")
            pairs.append((s_ids, c_ids))
        out.append(pairs)
    return out


def collate_pairs(arch: Arch, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                  device: Any = "cpu") -> ScoreBatch:
    """Right-padded batch; padding is masked out (attention) and ignored (labels)."""
    _check_arch(arch)
    b = len(pairs)
    if arch == "t5":
        s_len = max(len(s) for s, _ in pairs)
        t_len = max(len(c) for _, c in pairs)
        ids = torch.full((b, s_len), pad_id, dtype=torch.long)
        att = torch.zeros((b, s_len), dtype=torch.long)
        lab = torch.full((b, t_len), IGNORE, dtype=torch.long)
        for j, (s, c) in enumerate(pairs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
            lab[j, : len(c)] = torch.tensor(c)
    else:
        l_len = max(len(s) + len(c) for s, c in pairs)
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
                  pad_id: int, reduction: Literal["sum", "mean"] = "sum", batch_size: int = 16,
                  device: Any = "cpu") -> list[list[float]]:
    """Log-likelihood of every (source, choice) pair, batched across instances; same nesting as `encoded`."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"rank classification: reduction must be 'sum' or 'mean', got {reduction!r}")
    if batch_size < 1:
        raise ConfigError(f"rank classification: batch_size must be ≥ 1, got {batch_size}")
    flat = [(i, p) for i, pairs in enumerate(encoded) for p in pairs]
    scores: list[float] = []
    for k in range(0, len(flat), batch_size):
        chunk = [p for _, p in flat[k: k + batch_size]]
        tok, mask = score_fn(collate_pairs(arch, chunk, pad_id, device))
        total = tok.sum(-1)                                    # (B,)
        if reduction == "mean":
            total = total / mask.sum(-1).clamp_min(1)
        scores.extend(total.tolist())
    out: list[list[float]] = [[] for _ in encoded]
    for (i, _), s in zip(flat, scores):
        out[i].append(s)
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
                   choices: Sequence[Sequence[str]], reduction: Literal["sum", "mean"] = "sum",
                   batch_size: int = 16, max_source_len: Optional[int] = None, add_eos: Optional[bool] = None,
                   device: Any = None) -> list[list[float]]:
    """Summed (or per-token mean) log-likelihood of each answer choice given its source.

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
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return score_encoded(make_score_fn(forward, arch), arch, encoded, pad_id, reduction, batch_size,
                             _device_of(model, device))
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


def accuracy_per_prompt_then_dataset(predictions: Sequence[int], labels: Sequence[int], prompts: Sequence[str],
                                     datasets: Sequence[str]) -> dict[str, Any]:
    """Accuracy (×100) per (dataset, prompt), then per dataset the mean and median over its prompts (T0 reports
    the median), then the mean over datasets of each: {"datasets": {ds: {"prompts": {p: acc}, "mean", "median"}},
    "mean", "median"}."""
    if not (len(predictions) == len(labels) == len(prompts) == len(datasets)):
        raise DataError(f"accuracy: lengths differ (predictions {len(predictions)}, labels {len(labels)}, "
                        f"prompts {len(prompts)}, datasets {len(datasets)})")
    if not predictions:
        raise DataError("accuracy: no predictions")
    hits: dict[str, dict[str, list[int]]] = {}
    for p, y, pr, ds in zip(predictions, labels, prompts, datasets):
        hits.setdefault(ds, {}).setdefault(pr, []).append(int(p == y))
    per_ds: dict[str, Any] = {}
    for ds, by_prompt in hits.items():
        accs = {pr: 100.0 * sum(h) / len(h) for pr, h in by_prompt.items()}
        per_ds[ds] = {"prompts": accs, "mean": statistics.fmean(accs.values()),
                      "median": statistics.median(accs.values())}
    return {"datasets": per_ds,
            "mean": statistics.fmean(d["mean"] for d in per_ds.values()),
            "median": statistics.fmean(d["median"] for d in per_ds.values())}
