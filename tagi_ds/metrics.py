"""SNI's official generation metrics (ROUGE-L, exact match), reproduced on our predictions.

Matches `eval/automatic/evaluation.py` of allenai/natural-instructions (the script Tk-Instruct and TAGI report with):
- exact match compares SQuAD-style normalised strings *without* article removal: lower case, drop ASCII
  punctuation (`string.punctuation`), collapse whitespace;
- ROUGE-L is the F-measure of `rouge_score` with `use_stemmer=True` and its default tokenizer, on the *raw* strings
  (that tokenizer lower-cases and keeps [a-z0-9] only), `score(target=ref, prediction=pred)`;
- both take the max over an instance's references; corpus numbers are means ×100 rounded to 4 decimals;
- categories are grouped under `"_".join(name.lower().split())` (SNI's key for per-category tables).
The cross-lingual track (GPT-2 tokenizer in ROUGE) is reachable by passing `tokenizer=` (an object with
`.tokenize(str) -> list[str]`); by default we use the English ("default") track.
"""
from __future__ import annotations

import string
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

from rouge_score import rouge_scorer

from .errors import DataError

_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, remove ASCII punctuation, collapse whitespace (SNI keeps articles, unlike SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    return " ".join(s.split())


@lru_cache(maxsize=1)
def _default_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _scorer(tokenizer: Any) -> rouge_scorer.RougeScorer:
    if tokenizer is None:
        return _default_scorer()
    # SNI's xlingual scorer: custom tokenizer, no stemmer.
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)


def _check_refs(refs: Sequence[str], where: str) -> None:
    if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
        raise DataError(f"{where}: references must be a list of strings, got {type(refs).__name__}")
    if len(refs) == 0:
        raise DataError(f"{where}: an instance has no references; every evaluated instance needs at least one")


def rouge_l(pred: str, refs: Sequence[str], tokenizer: Any = None) -> float:
    """ROUGE-L F-measure in [0, 1], max over references."""
    _check_refs(refs, "rouge_l")
    scorer = _scorer(tokenizer)
    return max(scorer.score(target=r, prediction=pred)["rougeL"].fmeasure for r in refs)


def exact_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    _check_refs(refs, "exact_match")
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in refs))


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: Any = None) -> dict[str, float]:
    """Corpus ROUGE-L and EM, each the mean over instances ×100, rounded to 4 decimals as SNI does."""
    if len(predictions) != len(references):
        raise DataError(f"compute_metrics: {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise DataError("compute_metrics: no predictions to score")
    scorer = _scorer(tokenizer)
    em = rl = 0.0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        _check_refs(refs, f"compute_metrics instance {i}")
        if not isinstance(pred, str):
            raise DataError(f"compute_metrics instance {i}: prediction must be a string, got {type(pred).__name__}")
        em += exact_match(pred, refs)
        rl += max(scorer.score(target=r, prediction=pred)["rougeL"].fmeasure for r in refs)
    n = len(predictions)
    return {"rougeL": round(100.0 * rl / n, 4), "exact_match": round(100.0 * em / n, 4)}


def category_key(name: str) -> str:
    """SNI's group key for a category name: 'Question Answering' -> 'question_answering'."""
    return "_".join(name.lower().split())


def compute_grouped_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                            groups: Sequence[str], tokenizer: Any = None) -> dict[str, dict[str, float]]:
    """{group: {"rougeL", "exact_match"}} for any grouping (task name, category key, split …), first-seen order."""
    if not (len(predictions) == len(references) == len(groups)):
        raise DataError(f"compute_grouped_metrics: lengths differ (predictions {len(predictions)}, "
                        f"references {len(references)}, groups {len(groups)})")
    by_group: dict[str, tuple[list[str], list[Sequence[str]]]] = {}
    for pred, refs, g in zip(predictions, references, groups):
        ps, rs = by_group.setdefault(g, ([], []))
        ps.append(pred)
        rs.append(refs)
    return {g: compute_metrics(ps, rs, tokenizer=tokenizer) for g, (ps, rs) in by_group.items()}


def echo_reference(inputs: Sequence[str], references: Sequence[Sequence[str]],
                   transform: Optional[Callable[[str], str]] = None) -> dict[str, float]:
    """The trivial 'copy the input' baseline: how much of the metric an echo already earns."""
    preds = [transform(x) if transform else x for x in inputs]
    return compute_metrics(preds, references)
