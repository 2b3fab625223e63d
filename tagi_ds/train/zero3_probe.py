"""What ZeRO-3 really keeps of the frozen backbone on this rank, measured during a step.

Before the first forward every partitioned parameter is an empty tensor, so a check made there says "partitioned"
whatever happens next: parameters under the persistence threshold are gathered once and kept whole, and the prefetch
may gather most of the model at once. This probe samples, right after each of DeepSpeed's parameter fetches (forward
and backward), the bytes of backbone weights this rank holds: its shards plus every parameter that is whole at that
moment (gathered, in flight or persistent). The stage records the peak over its first two optimizer steps (DeepSpeed
records its fetch trace in the first and prefetches by it from the second) and what stays whole after them, as
fractions of the full model (summary.json `backbone_partition.first_steps`, and a log line).

The sampling walks the backbone's parameter list once per fetch, so it runs for those two steps only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch import nn

from ..run.dist import world_size


@dataclass
class BackboneBytes:
    full: int            # bytes of the whole backbone (every parameter at full size)
    shards: int          # bytes of this rank's shards (what ZeRO-3 keeps at rest)
    peak: int = 0        # most bytes held at once during the measured step (shards + whole parameters)
    at_rest: int = 0     # bytes held after the step (shards + parameters kept whole: persistent ones)
    fetches: int = 0     # parameter fetches sampled

    def facts(self) -> dict[str, Any]:
        return {"full_bytes": self.full, "shard_bytes": self.shards, "peak_bytes": self.peak,
                "at_rest_bytes": self.at_rest, "peak_fraction": round(self.peak / self.full, 4),
                "at_rest_fraction": round(self.at_rest / self.full, 4), "fetches_sampled": self.fetches}


def _zero3_params(backbone: nn.Module) -> list[nn.Parameter]:
    params = list(backbone.parameters())
    return params if params and hasattr(params[0], "ds_numel") else []


def partition_facts(backbone: nn.Module) -> dict[str, Any]:
    """ZeRO-3 layout of the frozen backbone's parameters before training (rank-local; no collectives)."""
    named = list(backbone.named_parameters())
    if not _zero3_params(backbone):
        return {"partitioned": False, "n_params": len(named)}
    w = world_size()
    name, big = max(named, key=lambda kv: kv[1].ds_numel)
    return {"partitioned": all(p.numel() == 0 for _, p in named), "n_params": len(named),
            "shards_ok": all(p.ds_tensor.numel() == math.ceil(p.ds_numel / w) for _, p in named),
            "example": {"name": name, "ds_numel": int(big.ds_numel), "numel": int(big.numel()),
                        "shard": int(big.ds_tensor.numel()), "status": str(big.ds_status)}}


@contextlib.contextmanager
def measure_backbone_bytes(backbone: nn.Module) -> Iterator[Optional[BackboneBytes]]:
    """Yield a BackboneBytes filled while the block runs (None when the backbone is not ZeRO-3 partitioned).

    Wraps DeepSpeed's `PartitionedParameterCoordinator.fetch_sub_module` for the block: every fetch (and the
    prefetches it starts) is followed by one sample."""
    params = _zero3_params(backbone)
    if not params:
        yield None
        return
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    stats = BackboneBytes(full=sum(int(p.ds_numel) * p.element_size() for p in params),
                          shards=sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params))

    def held() -> int:  # a released parameter is an empty tensor; a gathered or persistent one is whole
        return stats.shards + sum(p.numel() * p.element_size() for p in params)

    original = Coordinator.fetch_sub_module

    def fetch_and_sample(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        stats.peak = max(stats.peak, held())
        stats.fetches += 1
        return out

    Coordinator.fetch_sub_module = fetch_and_sample
    try:
        yield stats
    finally:
        Coordinator.fetch_sub_module = original
        stats.at_rest = held()
        stats.peak = max(stats.peak, stats.at_rest)
