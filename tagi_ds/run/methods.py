"""The evaluated methods and the finetune variants: names every stage, the pipeline and the evaluation agree on.

- no_ft: the frozen backbone reads the full Tk-Instruct prompt.
- no_instruction / tk_instruct: multitask LoRA baselines (stage `baselines`) on the instance part alone / on the
  full prompt.
- teacher: each seen task's own LoRA teacher (stage `teacher`) on the full prompt; no number on unseen tasks.
- hint, tagi and the ablations: hypernetwork exports of finetune variants (stage `finetune`, one folder each).
A finetune variant is the finetune stage with dotted config overrides (`VARIANT_OVERRIDES`).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

from ..errors import ConfigError

BASELINES = ("no_instruction", "tk_instruct")
HYPERNET_METHODS = ("hint", "tagi", "tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain", "tagi_no_fusion")
ALL_METHODS = ("no_ft",) + BASELINES + ("teacher",) + HYPERNET_METHODS
VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "tagi": {},
    "hint": {"finetune.lambda_kl": 0.0, "finetune.lambda_ins": 0.0},  # CE only, from the pretrain export
    "tagi_no_kl": {"finetune.lambda_kl": 0.0},
    "tagi_no_ins": {"finetune.lambda_ins": 0.0},
    "tagi_no_pretrain": {"finetune.init_from_pretrain": False},
    "tagi_no_fusion": {"hypernet.fusion": False},
}


def check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ConfigError(f"eval.methods: unknown method(s) {bad}; expected some of {list(ALL_METHODS)}")
    return list(methods)


def finetune_variants(cfg: Any) -> list[str]:
    """The finetune variants the run's methods need, in method order."""
    return [m for m in check_methods(cfg.eval.methods) if m in HYPERNET_METHODS]


def baseline_modes(cfg: Any) -> list[str]:
    return [m for m in check_methods(cfg.eval.methods) if m in BASELINES]


def needs_teachers(cfg: Any) -> bool:
    """Teachers (and their logit cache) are trained when a method reads them: the teacher row, or any finetune
    variant (its KL and L_ins terms; a CE-only variant checks them too)."""
    return "teacher" in cfg.eval.methods or bool(finetune_variants(cfg))


def _set_dotted(cfg: Any, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node = cfg
    for p in path:
        node = getattr(node, p)
    if not hasattr(node, leaf):
        raise ConfigError(f"override {dotted!r}: no such config key")
    setattr(node, leaf, value)


def variant_config(cfg: Any, variant: str) -> Any:
    """A copy of `cfg` with the finetune variant's overrides applied."""
    if variant not in VARIANT_OVERRIDES:
        raise ConfigError(f"finetune variant {variant!r}: expected one of {list(VARIANT_OVERRIDES)}")
    out = copy.deepcopy(cfg)
    for key, value in VARIANT_OVERRIDES[variant].items():
        _set_dotted(out, key, value)
    return out
