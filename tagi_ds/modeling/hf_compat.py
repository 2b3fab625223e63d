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


# ------------------------------------------------------------------------------------------------ T5 cross-attention
# What the TAGI student's cached instruction K/V (fusion.py) needs from transformers' T5, asked of the objects:
# - the decoder's cross-attention modules (`decoder.block[i].layer[1].EncDecAttention`: q/k/v/o linears, n_heads,
#   key_value_proj_dim, layer_idx);
# - keyword arguments a T5ForConditionalGeneration call receives travel down to every attention module (5.x: the
#   decoder stack, its blocks and their sublayers all forward **kwargs; 4.x dropped unknown keywords);
# - a cross-attention module returns (output, position_bias, attention_weights) (5.x; 4.x returned the cache too);
# - the input's cross K/V live in an EncoderDecoderCache's cross_attention_cache, flagged in `is_updated`.
T5_FUSION_KWARG = "tagi_instruction_kv"  # the keyword that carries the instruction K/V to the cross-attentions


def t5_cross_attentions(model: nn.Module) -> list[nn.Module]:
    """The decoder's cross-attention modules of a T5ForConditionalGeneration, in layer order."""
    return [block.layer[1].EncDecAttention for block in model.decoder.block]


def _takes_var_kwargs(fn) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def t5_kwargs_reach_cross_attention(model: nn.Module) -> bool:
    """True when a keyword given to the model's forward reaches the decoder's cross-attention modules (5.x layout:
    every level forwards **kwargs and the cross-attention returns (output, position_bias, weights))."""
    block = model.decoder.block[0]
    attn = block.layer[1].EncDecAttention
    levels = (type(model).forward, type(model.decoder).forward, type(block).forward, type(block.layer[1]).forward,
              type(attn).forward)
    params = inspect.signature(type(attn).forward).parameters
    return all(_takes_var_kwargs(f) for f in levels) and "output_attentions" not in params


def cross_attention_result(output, position_bias=None, weights=None) -> tuple:
    """What a T5 cross-attention module returns to its T5LayerCrossAttention (5.x layout)."""
    return output, position_bias, weights


def cached_cross_kv(cache: Any, layer_idx: int):
    """The (keys, values) an EncoderDecoderCache already holds for layer `layer_idx`'s cross-attention, else None."""
    from transformers import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(layer_idx):
        layer = cache.cross_attention_cache.layers[layer_idx]
        return layer.keys, layer.values
    return None


def store_cross_kv(cache: Any, layer_idx: int, keys, values) -> None:
    """Keep the cross-attention (keys, values) of layer `layer_idx` in an EncoderDecoderCache for the next decode
    steps (what HF's own T5 does); no cache (teacher forcing): nothing to keep."""
    from transformers import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        cache.cross_attention_cache.update(keys, values, layer_idx)
        cache.is_updated[layer_idx] = True
