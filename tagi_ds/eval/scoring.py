"""The evaluation's data and numbers: the run's splits, scores of one method on one split (ROUGE-L / EM overall, per
task, per category; accuracy per prompt → dataset → mean / median for rank-classified P3 tasks), the trivial floors,
and the predictions files.

The seen split. SNI and P3 runs evaluate "seen" on held-out instances of the training tasks only when the data holds
some back (the synthetic suite always does; data.registry `seen_held_back` > 0 otherwise); without them the registry
gives the first training instances (meta["seen_from"] = "train_instances"), which measures how well a method fits
its training data, not seen-task generalisation. `seen_source` says which, and the report labels the column so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..data.tasks import Task
from ..errors import DataError
from ..io_utils import atomic_write_text
from ..metrics import category_key, compute_grouped_metrics, compute_metrics
from .rank_classification import PromptResult, has_answer_choices, t0_report

POOLED = "unseen"


def eval_splits(cfg: Any) -> dict[str, list[Task]]:
    """The run's evaluation splits (every key of the registry but "train"), in registry order."""
    from ..data.registry import load_run_tasks_from_config

    splits = load_run_tasks_from_config(cfg)
    return {k: v for k, v in splits.items() if k != "train" and v}


def pooled_splits(splits: dict[str, Any]) -> dict[str, list[str]]:
    """Report splits that pool several evaluated ones: "unseen" = unseen_paraphrase + unseen_composition."""
    parts = [s for s in ("unseen_paraphrase", "unseen_composition") if s in splits]
    return {POOLED: parts} if POOLED not in splits and len(parts) > 1 else {}


def seen_source(splits: dict[str, list[Task]]) -> Optional[str]:
    """"held_back" (instances of the training tasks never trained on) or "train_instances" (the training instances
    themselves: a fit check); None without a seen split."""
    seen = splits.get("seen") or []
    if not seen:
        return None
    return "train_instances" if any(t.meta.get("seen_from") == "train_instances" for t in seen) else "held_back"


def _references(tasks: Sequence[Task]) -> list[list[str]]:
    return [list(i.references) for t in tasks for i in t.instances]


def _task_of_rows(tasks: Sequence[Task]) -> list[str]:
    return [t.name for t in tasks for _ in t.instances]


def _category_of_rows(tasks: Sequence[Task]) -> list[str]:
    return [category_key(t.categories[0]) if t.categories else "uncategorized" for t in tasks for _ in t.instances]


def score_split(tasks: Sequence[Task], preds: Sequence[str]) -> dict[str, Any]:
    """{"overall", "per_task", "per_category"} of one method on one split."""
    refs = _references(tasks)
    if len(preds) != len(refs):
        raise DataError(f"evaluate: {len(preds)} predictions for {len(refs)} instances")
    return {"overall": compute_metrics(preds, refs), "instances": len(refs),
            "per_task": compute_grouped_metrics(preds, refs, _task_of_rows(tasks)),
            "per_category": compute_grouped_metrics(preds, refs, _category_of_rows(tasks))}


def rank_classification_report(tasks: Sequence[Task], rows: Sequence[dict]) -> Optional[dict[str, Any]]:
    """`t0_report` (accuracy per prompt, per dataset mean and median, overall mean and median of the dataset
    medians) over the rank-classified tasks of a split, from its rows in task order; None when it has none."""
    results, pos = [], 0
    for t in tasks:
        part = rows[pos:pos + len(t.instances)]
        pos += len(t.instances)
        if not has_answer_choices(t):
            continue
        if any("choice" not in r for r in part):
            raise DataError(f"evaluate: task '{t.name}' has answer choices but its predictions are not ranked")
        results.append(PromptResult(t.name, str(t.meta.get("dataset", t.name)), str(t.meta.get("prompt", t.name)),
                                    [int(r["choice"]) for r in part], [int(r["label"]) for r in part]))
    return t0_report(results) if results else None


def echo_scores(splits: dict[str, list[Task]]) -> dict[str, dict[str, float]]:
    """The copy-the-input reference of every split (and of the pooled ones)."""
    out = {s: compute_metrics([i.input for t in ts for i in t.instances], _references(ts)) for s, ts in splits.items()}
    for name, parts in pooled_splits(splits).items():
        ts = [t for p in parts for t in splits[p]]
        out[name] = compute_metrics([i.input for t in ts for i in t.instances], _references(ts))
    return out


def demo_output_scores(splits: dict[str, list[Task]]) -> dict[str, Optional[dict[str, float]]]:
    """The 'copy the first demonstration's output' floor of every split (None where a task has no example)."""
    out: dict[str, Optional[dict[str, float]]] = {}
    groups = {**{s: [s] for s in splits}, **pooled_splits(splits)}
    for name, parts in groups.items():
        ts = [t for p in parts for t in splits[p]]
        if any(not t.positive_examples for t in ts):
            out[name] = None
            continue
        preds = [t.positive_examples[0].output for t in ts for _ in t.instances]
        out[name] = compute_metrics(preds, _references(ts))
    return out


def write_predictions(path: Path, tasks: Sequence[Task], preds: Sequence[str],
                      extra: Optional[Sequence[dict]] = None) -> None:
    """{"task", "id", "input", "prediction", "references"} per instance (+ the keys of `extra[i]`, e.g. the chosen
    answer's index and the scores of a rank-classified instance)."""
    pairs = [(t, i) for t in tasks for i in t.instances]
    rows = []
    for k, ((t, i), p) in enumerate(zip(pairs, preds)):
        row = {"task": t.name, "id": i.id, "input": i.input, "prediction": p, "references": list(i.references)}
        row.update(extra[k] if extra else {})
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(rows) + ("\n" if rows else ""))


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    """(predictions, references) of a predictions .jsonl (tests and re-scoring)."""
    preds, refs = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            preds.append(obj["prediction"])
            refs.append(obj["references"])
    return preds, refs
