"""Super-NaturalInstructions (SNI) task files → `Task`, with validation that names the file and key.

Native SNI layout (allenai/natural-instructions v2):
    <sni_dir>/tasks/<task>.json       {"Definition": [str], "Positive Examples": [{input, output, explanation}],
                                       "Negative Examples": [...], "Instances": [{id, input, output: [str]}],
                                       "Categories": [str], ...}
    <sni_dir>/splits/<name>_tasks.txt  one task name per line (also accepted under splits/default/)

Loading is all-or-nothing: every file of a split is read and validated before anything is returned, so an error
never leaves a half-loaded list behind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import DataError
from .tasks import Example, Instance, Task, cap_instances, draw_label

CapMode = Literal["random", "first"]


# ------------------------------------------------------------------------------------------------ one task file
def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read task file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); SNI task files are UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _expect_str(value: Any, path: Path, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _expect_str_list(value: Any, path: Path, key: str, non_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: key '{key}' must be a list of strings, got {_describe(value)}")
    if non_empty and not value:
        raise DataError(f"{path}: key '{key}' must be a non-empty list of strings, got []")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"list of {'/'.join(kinds) or 'nothing'}"
    return type(value).__name__


def _examples(data: dict, key: str, path: Path) -> tuple[Example, ...]:
    items = data.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{path}: key '{key}' must be a list of {{input, output, explanation}}, got {_describe(items)}")
    out = []
    for i, ex in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(ex, dict):
            raise DataError(f"{path}: key '{where}' must be an object with input/output, got {type(ex).__name__}")
        for field in ("input", "output"):
            if field not in ex:
                raise DataError(f"{path}: key '{where}.{field}' is missing")
        out.append(Example(
            input=_expect_str(ex["input"], path, f"{where}.input"),
            output=_expect_str(ex["output"], path, f"{where}.output"),
            explanation=_expect_str(ex.get("explanation", ""), path, f"{where}.explanation"),
        ))
    return tuple(out)


def _instances(data: dict, path: Path, seed: int) -> list[Instance]:
    if "Instances" not in data:
        raise DataError(f"{path}: required key 'Instances' is missing (a list of {{id, input, output: [str]}})")
    items = data["Instances"]
    if not isinstance(items, list):
        raise DataError(f"{path}: key 'Instances' must be a list of {{id, input, output}}, got {_describe(items)}")
    if not items:
        raise DataError(f"{path}: key 'Instances' is empty; a task needs at least one instance")
    out = []
    seen: set[str] = set()
    for i, inst in enumerate(items):
        where = f"Instances[{i}]"
        if not isinstance(inst, dict):
            raise DataError(f"{path}: key '{where}' must be an object with id/input/output, got {type(inst).__name__}")
        for field in ("id", "input", "output"):
            if field not in inst:
                raise DataError(f"{path}: key '{where}.{field}' is missing")
        iid = _expect_str(inst["id"], path, f"{where}.id")
        if iid in seen:
            raise DataError(f"{path}: key '{where}.id' repeats the id {iid!r}; instance ids must be unique")
        seen.add(iid)
        refs = tuple(_expect_str_list(inst["output"], path, f"{where}.output", non_empty=True))
        out.append(Instance(id=iid, input=_expect_str(inst["input"], path, f"{where}.input"), references=refs,
                            label=draw_label(refs, seed, iid)))
    return out


def load_sni_task(path: str | Path, max_instances: Optional[int] = 100, seed: int = 42,
                  cap: CapMode = "random") -> Task:
    """Read and validate one native SNI task file.

    `cap="random"` keeps `max_instances` chosen with `seed` (training); `cap="first"` keeps the first ones (SNI's
    evaluation convention: the first 100 instances of a test task). Labels are drawn with `seed` per instance id.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be a JSON object with Definition/Instances, got {type(data).__name__}")
    if "Definition" not in data:
        raise DataError(f"{path}: required key 'Definition' is missing (a list with the task definition)")
    definition = data["Definition"]
    if isinstance(definition, str):
        definition = [definition]
    definition = _expect_str_list(definition, path, "Definition", non_empty=True)
    categories = tuple(_expect_str_list(data.get("Categories", []), path, "Categories"))
    positives = _examples(data, "Positive Examples", path)
    negatives = _examples(data, "Negative Examples", path)
    instances = _instances(data, path, seed)
    name = path.stem
    if cap == "first":
        instances = instances if max_instances is None else instances[:max_instances]
    else:
        instances = cap_instances(instances, max_instances, seed, name)
    return Task(name=name, definition=definition[0], positive_examples=positives, negative_examples=negatives,
                instances=tuple(instances), categories=categories,
                meta={"source": "sni", "file": str(path)})


# ----------------------------------------------------------------------------------------------------- splits
def tasks_dir_of(sni_dir: str | Path) -> Path:
    """`<sni_dir>/tasks` when it exists, else `sni_dir` itself (a plain folder of task files)."""
    sni_dir = Path(sni_dir)
    if not sni_dir.is_dir():
        raise DataError(f"{sni_dir}: SNI folder not found")
    sub = sni_dir / "tasks"
    return sub if sub.is_dir() else sni_dir


def find_split_dir(sni_dir: str | Path, split_dir: str | Path | None = None) -> Optional[Path]:
    """The folder holding `<split>_tasks.txt`: `split_dir` if given, else splits/ then splits/default/; None if none."""
    if split_dir is not None:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: split folder not found (expected train_tasks.txt / test_tasks.txt in it)")
        return split_dir
    for cand in (Path(sni_dir) / "splits", Path(sni_dir) / "splits" / "default"):
        if cand.is_dir() and any(cand.glob("*_tasks.txt")):
            return cand
    return None


def read_split_list(split_file: Path, tasks_dir: Path) -> list[tuple[str, Path]]:
    """(task name, task file) per line; blank lines and '#' comments skipped; every task must have a file."""
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{split_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[str, Path]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        name = name.removesuffix(".json")
        if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            raise DataError(f"{split_file}:{lineno}: {name!r} is not a task name; a split list names task files "
                            f"of {tasks_dir} by their stem (no '/', not starting with '.')")
        if name in seen:
            raise DataError(f"{split_file}:{lineno}: task '{name}' is listed twice (first at line {seen[name]})")
        seen[name] = lineno
        file = tasks_dir / f"{name}.json"
        if not file.is_file():
            raise DataError(f"{split_file}:{lineno}: task '{name}' has no task file {file}")
        out.append((name, file))
    return out


def load_sni(sni_dir: str | Path, split: Optional[str] = "train", split_dir: str | Path | None = None,
             max_instances: Optional[int] = 100, seed: int = 42, max_tasks: Optional[int] = None,
             cap: CapMode = "random") -> list[Task]:
    """Load the tasks of one split (`splits/<split>_tasks.txt`, in its order), or every task file when `split` is None.

    A folder of task files without split lists is one split: `split=None` or `"train"` loads all of it; any other
    split name is an error. `max_tasks` keeps the first N of the list. Nothing is returned unless every file loads.
    """
    tasks_dir = tasks_dir_of(sni_dir)
    sdir = find_split_dir(sni_dir, split_dir)
    if split is None or (sdir is None and split == "train"):
        files = sorted(tasks_dir.glob("*.json"))
        if not files:
            raise DataError(f"{tasks_dir}: no *.json task files found")
        entries = [(f.stem, f) for f in files]
    else:
        if sdir is None:
            raise DataError(f"{sni_dir}: no split lists (splits/{split}_tasks.txt or splits/default/{split}_tasks.txt);"
                            f" a folder of task files without split lists is one split (`tagi-ds tasks --sni "
                            f"{sni_dir}` shows it); a run needs splits/train_tasks.txt and splits/test_tasks.txt")
        split_file = sdir / f"{split}_tasks.txt"
        if not split_file.is_file():
            have = ", ".join(sorted(p.name for p in sdir.glob("*_tasks.txt")))
            raise DataError(f"{split_file}: split list not found (have: {have})")
        entries = read_split_list(split_file, tasks_dir)
        if not entries:
            raise DataError(f"{split_file}: the split lists no tasks")
    if max_tasks is not None:
        entries = entries[:max_tasks]
    # Build the whole list first: an exception anywhere leaves the caller with nothing half-loaded.
    tasks = [load_sni_task(file, max_instances=max_instances, seed=seed, cap=cap) for _, file in entries]
    for task in tasks:
        task.meta["split"] = split if split is not None else "all"
    return tasks
