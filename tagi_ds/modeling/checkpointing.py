"""Non-reentrant activation checkpointing of the frozen backbone's blocks that keeps the LoRA hooks and the KV prefix.

HF's layer checkpointing cannot serve the TAGI student: it drops the key/value cache (the LLaMA instruction prefix) and
its recompute in backward runs after `hooks.apply` has ended, so the layers would be recomputed without LoRA. Here each
transformer block (LLaMA `model.layers[i]`, T5 `encoder.block[i]` / `decoder.block[i]`) runs, when grad is enabled,
under `torch.utils.checkpoint.checkpoint(use_reentrant=False)` with a function that
  - re-installs the LoRA hook state captured at forward time (the recompute adds the same per-row LoRA terms), and
  - for a DynamicCache (the prefix), restores every cache layer as it was before the block's first call while it
    recomputes, and puts it back after (the recompute must not append the input's keys a second time).
Non-reentrant checkpointing handles frozen inputs (no grad) and keyword arguments. Only the block's `forward` is
replaced (an instance attribute): module hooks on the block stay outside, its state_dict keys are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import TagiError
from .hf_compat import find_cache
from .lora import BatchedLoraHooks


def backbone_blocks(backbone: nn.Module, arch: str) -> list[nn.Module]:
    """The transformer blocks that get checkpointed, in execution order."""
    if arch == "t5":
        return list(backbone.encoder.block) + list(backbone.decoder.block)
    if arch == "llama":
        return list(backbone.model.layers)
    raise TagiError(f"activation checkpointing: unknown backbone arch {arch!r} (expected t5 or llama)")


@contextlib.contextmanager
def _cache_as(cache, snapshot: list[dict] | None) -> Iterator[None]:
    """Inside, every cache layer's attributes are `snapshot`'s (tensors are replaced on update, never written in
    place, so shallow copies of the layers' __dict__ suffice); the current ones come back on exit."""
    if snapshot is None:
        yield
        return
    now = [dict(layer.__dict__) for layer in cache.layers]
    for layer, snap in zip(cache.layers, snapshot):
        layer.__dict__.update(snap)
    try:
        yield
    finally:
        for layer, snap in zip(cache.layers, now):
            layer.__dict__.update(snap)


class _CheckpointedForward:
    """The replacement `forward` of one block. A class, not a closure, so deep copies of the model stay correct
    (the copy's forward refers to the copied block)."""

    is_tagi_checkpointed_forward = True

    def __init__(self, block: nn.Module, hooks: BatchedLoraHooks):
        self.block, self.hooks = block, hooks

    def __call__(self, *args, **kwargs):
        plain = type(self.block).forward  # the class's forward (HF's own checkpointing in it stays off)
        if not torch.is_grad_enabled():  # generation / evaluation: nothing to save, nothing to recompute
            return plain(self.block, *args, **kwargs)
        from transformers import Cache, DynamicCache

        cache = find_cache(kwargs)  # its keyword changed name across transformers versions (hf_compat)
        snapshot = None
        if isinstance(cache, DynamicCache):
            snapshot = [dict(layer.__dict__) for layer in cache.layers]  # before this block's update
        elif isinstance(cache, Cache):
            raise TagiError(f"activation checkpointing supports a DynamicCache prefix only, got {type(cache).__name__}"
                            " with grad enabled (train with use_cache=False)")
        state = self.hooks.current_state()
        first = [True]

        def run(*a, **kw):
            restore = contextlib.nullcontext() if first[0] else _cache_as(cache, snapshot)
            first[0] = False
            with restore, self.hooks.use_state(state):
                return plain(self.block, *a, **kw)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)


def hf_checkpointing_on(backbone: nn.Module) -> bool:
    """Whether transformers' own layer checkpointing is on (`is_activation_checkpointing` since 5.x)."""
    on = getattr(backbone, "is_activation_checkpointing", None)
    return bool(getattr(backbone, "is_gradient_checkpointing", False) if on is None else on)


def enable_block_checkpointing(backbone: nn.Module, arch: str, hooks: BatchedLoraHooks, enabled: bool = True) -> int:
    """Turn the checkpointing of `backbone`'s blocks on (or off); returns the number of blocks switched.

    Refuses a backbone on which HF's own gradient checkpointing is on (it would drop the prefix)."""
    if enabled and hf_checkpointing_on(backbone):
        raise TagiError("activation checkpointing: HF gradient checkpointing is already on for this backbone; "
                        "call gradient_checkpointing_disable() first (it drops the instruction prefix)")
    blocks = backbone_blocks(backbone, arch)
    for block in blocks:
        if enabled:
            block.forward = _CheckpointedForward(block, hooks)
        elif getattr(block.__dict__.get("forward"), "is_tagi_checkpointed_forward", False):
            del block.forward  # back to the class's forward
    return len(blocks)


def is_block_checkpointing(backbone: nn.Module, arch: str) -> bool:
    return any(getattr(b.__dict__.get("forward"), "is_tagi_checkpointed_forward", False)
               for b in backbone_blocks(backbone, arch))
