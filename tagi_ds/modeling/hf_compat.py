"""The few places where transformers' API moved inside the range pyproject.toml accepts, in one file.

transformers 5.x renamed the key/value cache argument and output field from `past_key_values` to `cache` (5.2x; the
old keyword is accepted with a warning until 5.40). Decoder layers received it as `past_key_value` (4.5x),
`past_key_values` (early 5.x) or `cache` (later 5.x). Code that looked the cache up under one name silently found
nothing on the others: activation checkpointing then recomputed a LLaMA block without restoring the instruction
prefix and the attention shapes no longer matched (issue 13). Everything here asks the object, never the version.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

from torch import nn

# Names transformers has used for the key/value cache argument, newest first.
CACHE_ARG_NAMES = ("cache", "past_key_values", "past_key_value")


@functools.lru_cache(maxsize=None)
def _cache_arg_of(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters  # follows functools.wraps (deprecate_kwarg)
    for name in CACHE_ARG_NAMES:
        if name in params:
            return name
    return "past_key_values"


def cache_arg(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its key/value cache."""
    return _cache_arg_of(type(model))


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """{name: cache} for `model(**…)`, under the name this transformers expects (no deprecation warning)."""
    return {cache_arg(model): cache}


def output_cache(out: Any) -> Any:
    """The key/value cache a model output carries (`cache` in new versions, `past_key_values` in older)."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if value is not None:
            return value
    return None


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The Cache object among a layer call's keyword arguments, whatever the keyword is called (None if absent)."""
    from transformers import Cache

    for name in CACHE_ARG_NAMES:
        value = kwargs.get(name)
        if isinstance(value, Cache):
            return value
    return next((v for v in kwargs.values() if isinstance(v, Cache)), None)
