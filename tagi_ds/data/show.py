"""`tagi-ds tasks`: what a run trains and tests on, and the exact texts each model reads.

    tagi-ds tasks (--config X.yaml [key=value ...] | --sni DIR | --p3 DIR | --synthetic) [--json] [--show TASK]

Plain output: one row per split (tasks, instances, categories); an SNI folder without split lists (a plain folder of
task files, or its tasks/ subfolder) is one split, "all". `--json` prints one object:
    {"tasks": n, "instances": n, "categories": {name: n},
     "splits": {split: {"tasks": n, "instances": n, "categories": {name: n}}}}
Top-level totals count distinct task names (a seen split re-uses its training tasks' names), instances summed over
all splits, and categories over distinct tasks. `--show TASK` prints, for the task's first instance, the teacher's
full Tk-Instruct source, the student hypernetwork's instruction, the student backbone's input and the label.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional

from ..errors import DataError
from .tasks import Task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="recipe YAML: show the tasks that run uses (key=value overrides follow)")
    src.add_argument("--sni", metavar="DIR", help="SNI folder (tasks/*.json, splits/*_tasks.txt), or a plain folder of "
                                                  "task files (one split)")
    src.add_argument("--p3", metavar="DIR", help="P3 folder (one folder per dataset-prompt)")
    src.add_argument("--synthetic", action="store_true", help="the offline synthetic suite (default settings)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides (with --config)")
    parser.add_argument("--split-dir", help="SNI split-list folder (default: <DIR>/splits or splits/default)")
    parser.add_argument("--max-instances", type=int, default=100, help="training instances per task (seeded cap)")
    parser.add_argument("--max-eval-instances", type=int, default=100, help="first N instances of evaluation tasks")
    parser.add_argument("--max-tasks", type=int, default=None, help="first N training tasks")
    parser.add_argument("--seed", type=int, default=42, help="seed for the instance cap and label draws")
    parser.add_argument("--num-pos", type=int, default=2, help="positive examples in the prompt (Def + 2 Pos)")
    parser.add_argument("--max-source-length", type=int, default=1024, help="token cap of prompts (with --tokenizer)")
    parser.add_argument("--tokenizer", help="local tokenizer folder: apply max_source_length as the models would")
    parser.add_argument("--json", action="store_true", help="print counts as JSON")
    parser.add_argument("--show", metavar="TASK", help="print the texts each model gets for TASK's first instance")


def summarize(tasks: list[Task]) -> dict:
    return {"tasks": len(tasks), "instances": sum(len(t.instances) for t in tasks),
            "categories": dict(sorted(Counter(c for t in tasks for c in t.categories).items()))}


def summary(splits: dict[str, list[Task]]) -> dict:
    """The `--json` object (see module docstring)."""
    unique: dict[str, Task] = {}
    for tasks in splits.values():
        for t in tasks:
            unique.setdefault(t.name, t)
    total = summarize(list(unique.values()))
    total["instances"] = sum(len(t.instances) for tasks in splits.values() for t in tasks)
    total["splits"] = {name: summarize(tasks) for name, tasks in splits.items()}
    return total


def format_table(splits: dict[str, list[Task]]) -> str:
    lines = [f"{'split':<20} {'tasks':>6} {'instances':>10}  categories"]
    for name, tasks in splits.items():
        s = summarize(tasks)
        cats = sorted(s["categories"].items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{c} {n}" for c, n in cats[:6]) + (f", … ({len(cats)} in all)" if len(cats) > 6 else "")
        lines.append(f"{name:<20} {s['tasks']:>6} {s['instances']:>10}  {shown or '-'}")
    return "\n".join(lines)


def show_texts(task: Task, num_pos: int = 2, add_definition: bool = True, tokenizer=None,
               max_source_length: int = 1024) -> str:
    """The exact strings the teacher, the hypernetwork and the student's backbone get for the first instance."""
    from . import prompts

    if not task.instances:
        raise DataError(f"task '{task.name}' has no instances to show")
    inst = task.instances[0]
    parts = [
        ("teacher / Tk-Instruct source (prompts.build_source)",
         prompts.build_source(task, inst, num_pos, add_definition, tokenizer, max_source_length)),
        ("student hypernetwork instruction, once per task (prompts.build_instruction)",
         prompts.build_instruction(task, num_pos, add_definition, tokenizer, max_source_length)),
        ("student backbone input (prompts.build_task_input)", prompts.build_task_input(inst)),
        ("label (drawn once per instance)", inst.label),
    ]
    head = f"task {task.name}  instance {inst.id}  categories {', '.join(task.categories) or '-'}"
    if inst.answer_choices:
        head += f"  answer choices {list(inst.answer_choices)}"
    # repr-free framing: the texts are printed verbatim between markers so trailing spaces/newlines stay visible.
    return head + "\n" + "\n".join(f"----- {title} -----\n{text}\n----- end -----" for title, text in parts)


def _load(args) -> tuple[dict[str, list[Task]], dict]:
    from .registry import load_run_tasks, load_run_tasks_from_config

    prompt = {"num_pos": args.num_pos, "add_definition": True, "max_source_length": args.max_source_length,
              "tokenizer": args.tokenizer}
    if args.config:
        from ..config import load_config

        cfg = load_config(args.config, args.overrides)
        prompt.update(num_pos=cfg.data.num_pos_examples, add_definition=cfg.data.add_task_definition,
                      max_source_length=cfg.data.max_source_length)
        if prompt["tokenizer"] is None and cfg.backbone.name_or_path != "auto":
            prompt["tokenizer"] = cfg.backbone.tokenizer or cfg.backbone.name_or_path
            prompt["tokenizer_optional"] = True  # from the config: may be a hub id not cached offline
        return load_run_tasks_from_config(cfg), prompt
    if args.overrides:
        raise DataError(f"key=value overrides ({' '.join(args.overrides)}) only apply with --config")
    common = dict(max_instances=args.max_instances, max_eval_instances=args.max_eval_instances, seed=args.seed,
                  max_tasks=args.max_tasks)
    if args.sni:
        from .sni import find_split_dir, load_sni

        if find_split_dir(args.sni, args.split_dir) is None:  # a plain folder of task files: one split, "all"
            return {"all": load_sni(args.sni, None, max_instances=args.max_instances, seed=args.seed,
                                    max_tasks=args.max_tasks)}, prompt
        return load_run_tasks("sni", sni_dir=args.sni, sni_split_dir=args.split_dir, **common), prompt
    if args.p3:
        return load_run_tasks("p3", p3_dir=args.p3, **common), prompt
    return load_run_tasks("synthetic", **common), prompt


def _tokenizer(path: Optional[str], optional: bool = False):
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        # From the config it may be a hub id: use the local cache only, never the network.
        return AutoTokenizer.from_pretrained(path, local_files_only=optional)
    except Exception as e:  # offline hub misses, bad folders: the user needs the path
        if optional:
            print(f"note: tokenizer {path} not loadable here ({type(e).__name__}); texts shown untruncated "
                  f"(no max_source_length example dropping)", file=sys.stderr)
            return None
        raise DataError(f"--tokenizer {path}: cannot load a tokenizer from it ({e})") from None


def main(args) -> int:
    splits, prompt = _load(args)
    if args.show:
        found = next((t for tasks in splits.values() for t in tasks if t.name == args.show), None)
        if found is None:
            names = sorted({t.name for tasks in splits.values() for t in tasks})
            close = [n for n in names if args.show in n][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise DataError(f"task '{args.show}' is in none of the splits ({', '.join(splits)}){hint}")
        tok = _tokenizer(prompt["tokenizer"], prompt.get("tokenizer_optional", False))
        print(show_texts(found, prompt["num_pos"], prompt["add_definition"], tok, prompt["max_source_length"]))
        return 0
    if args.json:
        print(json.dumps(summary(splits), ensure_ascii=False))
    else:
        print(format_table(splits))
    return 0
