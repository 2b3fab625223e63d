"""`tagi-ds <command> ...`: thin parsing and dispatch; every command lives in its own module.

Two kinds of command:
- stages (`--config X.yaml [key=value ...]`): the CLI loads and validates the typed config and calls the module's
  `main(args)` with `args.cfg` set. A module may list `EXTRA_KEYS` (e.g. `task`, `array_index`): such `key=value`
  words are not config keys and arrive in `args.extra`.
- tools: the module's `add_arguments(parser)` defines its own flags; `main(args)` gets them.

Errors meant for a person (`TagiError`) print as one paragraph and exit 2; so do failures of the machine rather
than of the code: an OSError (a full disk, a read-only or foreign folder, a missing device) prints what failed and
where, in one line. `--debug` (or TAGI_DEBUG=1) shows the traceback. Only the chosen command's module is imported,
so `--help` and a bad option answer fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from .errors import ConfigError, TagiError


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    takes_config: bool
    ranks: bool = True  # runs under torchrun / srun with several ranks (splits its units or trains together)


COMMANDS: dict[str, Command] = {
    "tasks": Command("tagi_ds.data.show", "show what a run trains and tests on (tasks, instances, prompt texts)", False, ranks=False),
    "backbone": Command("tagi_ds.train.backbone_stage", "build the offline tiny backbone (tokenizer + copy pretraining)", True),
    "teacher": Command("tagi_ds.train.teacher", "train per-task LoRA teachers (task=NAME | array_index=N | --list)", True),
    "cache-logits": Command("tagi_ds.train.cache_logits", "write teacher top-k log-probs to disk (task=NAME | array_index=N)", True),
    "inspect-cache": Command("tagi_ds.distill.inspect", "print a logit cache's tasks, tokens, bytes/token, kept mass", False, ranks=False),
    "pretrain": Command("tagi_ds.train.pretrain", "stage 1: hypernetwork pretraining on plain text (HINT split)", True),
    "finetune": Command("tagi_ds.train.finetune", "stage 2: hypernetwork distillation (CE + KL + L_ins)", True),
    "baselines": Command("tagi_ds.train.baselines", "multitask LoRA baselines: tk_instruct, no_instruction (mode=NAME)",
                         True),
    "evaluate": Command("tagi_ds.eval.evaluate", "evaluate methods on seen and unseen tasks, write the report", True),
    "pipeline": Command("tagi_ds.pipeline", "all stages in order: the main job (--from STAGE redoes one)", True),
    "generate-adapter": Command("tagi_ds.adapters.generate", "instruction -> standard PEFT LoRA adapter directory", False, ranks=False),
    "predict": Command("tagi_ds.adapters.predict", "predict with a generated adapter on inputs.jsonl", False, ranks=False),
    "plan": Command("tagi_ds.plan.cli", "per-stage GPU / host memory, disk and time of a run on N x G GPUs", False, ranks=False),
}


def build_parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """Only the chosen command's module is imported (torch etc. load once, and `--help` stays fast)."""
    parser = argparse.ArgumentParser(
        prog="tagi-ds",
        description="TAGI: a hypernetwork that turns a task instruction into LoRA adapters for a frozen LLM.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    modules = {}
    for name, cmd in COMMANDS.items():
        mod = importlib.import_module(cmd.module) if name == chosen else None
        modules[name] = mod
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
        if cmd.takes_config:
            p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
            p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.steps=100")
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser, modules


def _split_extra(overrides: list[str], extra_keys: set[str]) -> tuple[list[str], dict[str, str]]:
    keep, extra = [], {}
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if key in extra_keys and "=" in ov:
            extra[key] = ov.split("=", 1)[1]
        else:
            keep.append(ov)
    return keep, extra


def _refuse_multi_rank(command: str) -> None:
    """A one-process tool started by torchrun / srun with N ranks would run N times and race on its output."""
    from .run.dist import launched_ranks

    n = launched_ranks()
    if n > 1:
        raise ConfigError(f"runs in one process, but the launcher started {n} ranks (torchrun / srun "
                          f"--ntasks): run `tagi-ds {command}` without a launcher")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser, modules = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TAGI_DEBUG") == "1"
    try:
        if not COMMANDS[args.command].ranks:
            _refuse_multi_rank(args.command)
        mod = modules[args.command]
        if COMMANDS[args.command].takes_config:
            from .config import load_config

            from .run.preflight import check_run_config

            overrides, args.extra = _split_extra(args.overrides, set(getattr(mod, "EXTRA_KEYS", ())))
            args.cfg = load_config(args.config, overrides)
            if not getattr(mod, "VALIDATES_ITSELF", False):  # the pipeline orders its own checks (validate())
                check_run_config(args.cfg)  # the backbone / tokenizer source, before anything is written
        code = mod.main(args)
        return int(code or 0)
    except TagiError as e:
        if debug:
            raise
        kind = "stopped" if e.exit_code == 75 else "error"  # 75: run.signals.Stopped, state saved for a resume
        print(f"tagi-ds {args.command}: {kind}: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if debug:
            raise
        from .io_utils import describe_os_error

        print(f"tagi-ds {args.command}: error: {describe_os_error(e)} (--debug shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tagi-ds {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
