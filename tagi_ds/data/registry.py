"""Which tasks a run trains and evaluates on, by source, as a dict of named splits.

Keys: "train" and the evaluation splits: "seen" and "unseen" for SNI and P3; "seen", "unseen_paraphrase" and
"unseen_composition" for the synthetic suite.

"seen" (tasks trained on, judged on their own instances):
- synthetic: the suite's held-back instances of the training tasks (never trained on);
- SNI folders that ship a `seen_eval_tasks.txt` split (the synthetic suite written as SNI): that split;
- otherwise, with `seen_held_back > 0`: the last `seen_held_back` instances of each training task, removed from
  training; with `seen_held_back == 0`: the first `max_eval_instances` *training* instances of each training task
  (a fit check, not a generalisation one; meta["seen_from"] says which).
Unseen tasks are evaluated on their first `max_eval_instances` instances (SNI's convention).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from ..errors import DataError
from .tasks import Task

SPLITS_BY_SOURCE = {
    "sni": ("train", "seen", "unseen"),
    "p3": ("train", "seen", "unseen"),
    "synthetic": ("train", "seen", "unseen_paraphrase", "unseen_composition"),
}


def _first(tasks: list[Task], n: Optional[int]) -> list[Task]:
    return tasks if n is None else [t.with_instances(t.instances[:n]) for t in tasks]


def _seen_split(train: list[Task], held_back: int, max_eval: Optional[int]) -> tuple[list[Task], list[Task]]:
    """(train without held-back instances, seen split), see the module docstring."""
    if held_back <= 0:
        seen = [replace(t, meta={**t.meta, "split": "seen", "seen_from": "train_instances"}) for t in train]
        return train, _first(seen, max_eval)
    kept, seen = [], []
    for t in train:
        k = min(held_back, len(t.instances) - 1)  # a task keeps at least one training instance
        if k <= 0:
            raise DataError(f"task '{t.name}' has {len(t.instances)} instance(s): none left to hold back for "
                            f"seen-task evaluation (seen_held_back={held_back})")
        kept.append(t.with_instances(t.instances[:-k]))
        seen.append(replace(t.with_instances(t.instances[-k:]),
                            meta={**t.meta, "split": "seen", "seen_from": "held_back"}))
    return kept, _first(seen, max_eval)


def _check(splits: dict[str, list[Task]], source: str) -> dict[str, list[Task]]:
    if not splits["train"]:
        raise DataError(f"source '{source}': no training tasks")
    train_names = {t.name for t in splits["train"]}
    for key, tasks in splits.items():
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise DataError(f"source '{source}': split '{key}' lists tasks twice: {', '.join(dup)}")
        if key.startswith("unseen"):
            leak = sorted(train_names & set(names))[:5]
            if leak:
                raise DataError(f"source '{source}': unseen split '{key}' shares tasks with train: {', '.join(leak)}")
    return splits


def load_run_tasks(source: str, *, sni_dir: Optional[str] = None, sni_split_dir: Optional[str] = None,
                   p3_dir: Optional[str] = None, synthetic_kwargs: Optional[dict[str, Any]] = None,
                   max_instances: Optional[int] = 100, max_eval_instances: Optional[int] = 100, seed: int = 42,
                   max_tasks: Optional[int] = None, p3_num_demonstrations: int = 16,
                   seen_held_back: int = 0) -> dict[str, list[Task]]:
    """Every split of a run, keyed as in SPLITS_BY_SOURCE. All-or-nothing like the loaders below it.

    `max_instances` caps training instances per task (seeded); `max_tasks` keeps the first N training tasks (and
    their seen split); synthetic instance counts come from `synthetic_kwargs` (build_suite's arguments).
    """
    if source == "sni":
        from .sni import find_split_dir, load_sni, tasks_dir_of

        if sni_dir is None:
            raise DataError("data.source=sni needs data.sni_dir (a folder with tasks/*.json and splits/)")
        tasks_dir_of(sni_dir)  # "SNI folder not found" before anything else
        sdir = find_split_dir(sni_dir, sni_split_dir)
        if sdir is None:  # before reading any task file: a run needs both splits
            raise DataError(f"{sni_dir}: no split lists (splits/train_tasks.txt and splits/test_tasks.txt, or "
                            f"splits/default/); a run trains on one split and tests on another. A plain folder of "
                            f"task files is one split: `tagi-ds tasks --sni {sni_dir}` shows it")
        extra = seen_held_back if seen_held_back > 0 else 0
        train = load_sni(sni_dir, "train", sdir, None if max_instances is None else max_instances + extra, seed,
                         max_tasks)
        if sdir is not None and (sdir / "seen_eval_tasks.txt").is_file():
            # The synthetic suite written as SNI: held-back instances live in '<task>__seen_eval' files; they
            # are evaluated under the training task's own name (its teacher and adapter are keyed by it).
            names = {t.name for t in train}
            seen = [replace(t, name=t.name.removesuffix("__seen_eval"))
                    for t in load_sni(sni_dir, "seen_eval", sdir, max_eval_instances, seed, cap="first")]
            seen = [t for t in seen if t.name in names]
            train = [t.with_instances(t.instances[:max_instances]) if max_instances else t for t in train]
        else:
            train, seen = _seen_split(train, seen_held_back, max_eval_instances)
        unseen = load_sni(sni_dir, "test", sdir, max_eval_instances, seed, cap="first")
        return _check({"train": train, "seen": seen, "unseen": unseen}, source)
    if source == "p3":
        from .p3 import load_p3

        if p3_dir is None:
            raise DataError("data.source=p3 needs data.p3_dir (one folder per dataset-prompt)")
        extra = seen_held_back if seen_held_back > 0 else 0
        train = load_p3(p3_dir, "train", p3_num_demonstrations,
                        None if max_instances is None else max_instances + extra, seed, max_tasks)
        train, seen = _seen_split(train, seen_held_back, max_eval_instances)
        unseen = load_p3(p3_dir, "unseen", p3_num_demonstrations, max_eval_instances, seed)
        return _check({"train": train, "seen": seen, "unseen": unseen}, source)
    if source == "synthetic":
        from .synthetic import build_suite

        suite = build_suite(**(synthetic_kwargs or {}))
        train = suite.train if max_tasks is None else suite.train[:max_tasks]
        names = {t.name for t in train}
        return _check({
            "train": train,
            "seen": _first([t for t in suite.seen_eval if t.name in names], max_eval_instances),
            "unseen_paraphrase": _first(suite.unseen_paraphrase, max_eval_instances),
            "unseen_composition": _first(suite.unseen_composition, max_eval_instances),
        }, source)
    raise DataError(f"data.source must be one of {', '.join(SPLITS_BY_SOURCE)}, got {source!r}")


def load_run_tasks_from_config(cfg) -> dict[str, list[Task]]:
    """`load_run_tasks` with the arguments a `RunConfig` gives (recipes and `tagi-ds tasks --config`)."""
    import dataclasses

    d = cfg.data
    return load_run_tasks(d.source, sni_dir=d.sni_dir, sni_split_dir=d.sni_split_dir, p3_dir=d.p3_dir,
                          synthetic_kwargs=dataclasses.asdict(d.synthetic),
                          max_instances=d.max_instances_per_task, max_eval_instances=d.max_eval_instances_per_task,
                          seed=d.seed, max_tasks=d.max_tasks, p3_num_demonstrations=d.p3_num_demonstrations,
                          seen_held_back=d.seen_held_back)
