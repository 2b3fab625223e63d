"""Batched per-task LoRA applied by forward hooks: each batch row gets its own task's adapter.

Base weights are never read or written by the hooks (they only see a linear's input and output), so the same code
works on ZeRO-3-partitioned modules, with generated adapters (hypernetwork outputs) and with trainable ones
(teachers: nn.Parameters). Layout is PEFT's: A (r, d_in), B (d_out, r), y = W x + s·B(A x).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..errors import ArtifactMismatchError, TagiError
from ..kernels import dispatch
from ..kernels.grouped_lora import TaskGroups
from .backbone import TargetSpec, module_types

# module_type → (A (n_tasks, n_layers, r, d_in), B (n_tasks, n_layers, d_out, r))
Adapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class _LoraHook:
    """The forward hook of one target linear; a class (not a closure) so copies of the model can recognise it."""

    is_tagi_lora_hook = True

    def __init__(self, owner: "BatchedLoraHooks", spec: TargetSpec):
        self.owner, self.spec = owner, spec

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self.owner._state
        if state is None:
            return None  # outside `apply`: the plain linear
        A, B = state.layers[self.spec.module_type]
        A, B = A[self.spec.layer], B[self.spec.layer]  # (n_tasks, r, d_in), (n_tasks, d_out, r)
        task_ids, groups = state.task_ids, state.groups
        x = inputs[0]
        squeeze = x.dim() == 2  # (N, d_in): one token per row
        if squeeze:
            x, output = x.unsqueeze(1), output.unsqueeze(1)
        if x.shape[0] != task_ids.shape[0]:
            raise TagiError(
                f"LoRA hook on {self.spec.name}: the batch has {x.shape[0]} rows but task_ids has "
                f"{task_ids.shape[0]}; every row needs one task id (greedy decoding only: no beam expansion)")
        # output + the LoRA term (N, T, d_out), the addition fused into the term's last matmul where it can be
        y = dispatch.segmented_lora(x, A, B, task_ids, self.owner.scale, backend=self.owner.backend, groups=groups,
                                    base=output)
        return y.squeeze(1) if squeeze else y


class HookState(NamedTuple):
    """What the hooks read inside `apply`. `layers` holds each module type's A and B unbound along the layer axis,
    once per forward: a hook that indexed A[:, layer] itself would make autograd build a zero tensor the size of all
    layers for each layer's gradient (SelectBackward), O(layers^2) bytes per step; unbind's backward stacks once."""
    adapters: Adapters
    task_ids: torch.Tensor
    groups: Optional[TaskGroups]
    layers: dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]


class BatchedLoraHooks:
    """Forward hooks on every target nn.Linear; active only inside `with hooks.apply(adapters, task_ids):`."""

    def __init__(self, model: nn.Module, specs: Sequence[TargetSpec], scale: float, backend: str = "auto"):
        self.specs = list(specs)
        self.scale = float(scale)
        self.backend = backend
        self._state: HookState | None = None
        self._handles = []
        self._shapes: dict[str, tuple[int, int, int]] = {}  # module_type → (n_layers, d_in, d_out)
        for spec in self.specs:
            module = model.get_submodule(spec.name)
            if not isinstance(module, nn.Linear):
                raise TagiError(f"LoRA target {spec.name} is a {type(module).__name__}, expected nn.Linear")
            self._handles.append(module.register_forward_hook(_LoraHook(self, spec)))
            n, d_in, d_out = self._shapes.get(spec.module_type, (0, spec.d_in, spec.d_out))
            if (d_in, d_out) != (spec.d_in, spec.d_out):
                raise TagiError(f"LoRA module type {spec.module_type} mixes shapes: {spec.name} is "
                                f"{spec.d_in}→{spec.d_out}, others {d_in}→{d_out}")
            self._shapes[spec.module_type] = (max(n, spec.layer + 1), d_in, d_out)

    def check_adapters(self, adapters: Adapters, n_tasks: int | None = None) -> None:
        """Raise ArtifactMismatchError unless `adapters` has every module type with the expected shapes."""
        for mt, (n_layers, d_in, d_out) in self._shapes.items():
            if mt not in adapters:
                raise ArtifactMismatchError(f"adapters lack module type {mt!r} (have {sorted(adapters)})")
            A, B = adapters[mt]
            ok = (A.dim() == 4 and B.dim() == 4 and A.shape[1] == B.shape[1] == n_layers and A.shape[3] == d_in
                  and B.shape[2] == d_out and A.shape[2] == B.shape[3] and A.shape[0] == B.shape[0])
            if not ok or (n_tasks is not None and A.shape[0] != n_tasks):
                raise ArtifactMismatchError(
                    f"adapter {mt!r}: A {tuple(A.shape)}, B {tuple(B.shape)}; expected A (n_tasks, {n_layers}, r, "
                    f"{d_in}) and B (n_tasks, {n_layers}, {d_out}, r)")

    @contextlib.contextmanager
    def apply(self, adapters: Adapters, task_ids: torch.Tensor) -> Iterator[None]:
        """Inside, every target linear adds its row's task LoRA. task_ids: (N,) long, indices into adapters' dim 0."""
        if self._state is not None:
            raise TagiError("BatchedLoraHooks.apply is not re-entrant: leave the current `with` block first")
        self.check_adapters(adapters)
        n_tasks = next(iter(adapters.values()))[0].shape[0]
        task_ids = task_ids.long()
        if task_ids.dim() != 1 or (task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks)):
            raise TagiError(f"task_ids must be a 1-D tensor of indices in [0, {n_tasks}), got {task_ids.tolist()}")
        # rows grouped by task once per forward, for every hooked linear (torch path only: the fused kernel reads
        # task_ids itself, and grouping costs a device-to-host copy of them)
        ref = dispatch.resolve_backend(self.backend, task_ids.device) == "reference"
        groups = TaskGroups.of(task_ids) if ref and task_ids.numel() else None
        layers = {mt: (A.unbind(1), B.unbind(1)) for mt, (A, B) in adapters.items()}
        self._state = HookState(adapters, task_ids, groups, layers)
        try:
            yield
        finally:
            self._state = None

    def current_state(self) -> HookState | None:
        """The HookState active now, or None outside `apply` (give it back to `use_state`)."""
        return self._state

    @contextlib.contextmanager
    def use_state(self, state: HookState | None) -> Iterator[None]:
        """Re-install a state taken by `current_state()` (activation checkpointing: the recompute in backward runs
        after `apply` has ended and must add the same LoRA terms); the previous state comes back on exit."""
        prev, self._state = self._state, state
        try:
            yield
        finally:
            self._state = prev

    def remove(self) -> None:
        """Detach the hooks from the model for good."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW = s·B·A for one adapter: A (r, d_in), B (d_out, r) → (d_out, d_in), in `dtype` (float32 by default)."""
    return scale * (B.to(dtype) @ A.to(dtype))


@contextlib.contextmanager
def merged_in_place(model: nn.Module, specs: Sequence[TargetSpec], adapters: Mapping, scale: float,
                    what: str = "the adapter") -> Iterator[nn.Module]:
    """`model` with one LoRA (adapters: module type → (A (layers, r, d_in), B (layers, d_out, r))) merged into its
    target weights, W + s·B·A in float32 then cast back; the original weights are copied to the host first and put
    back on exit, bit for bit (an unmerge by subtraction would not be exact in bf16). `what` names the adapter in
    the error a non-finite merge raises."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for spec in specs:
                linear = model.get_submodule(spec.name)
                A, B = adapters[spec.module_type]
                dev = linear.weight.device
                new_w = linear.weight.float() + delta_weight(A[spec.layer].to(dev), B[spec.layer].to(dev), scale)
                if not torch.isfinite(new_w).all():
                    raise ArtifactMismatchError(f"{what}: merging into {spec.name} gives non-finite weights")
                saved[spec.name] = linear.weight.detach().to("cpu", copy=True)
                linear.weight.copy_(new_w.to(linear.weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def merge_into_copy(model: nn.Module, specs: Sequence[TargetSpec], adapters: Adapters, task_index: int,
                    scale: float) -> nn.Module:
    """A deep copy of `model` with task `task_index`'s ΔW merged into each target weight (the original is untouched).

    Any LoRA hooks the copy inherited are stripped, so the copy is a plain model. Needs full (not ZeRO-3-partitioned)
    weights. Raises ArtifactMismatchError if a merged weight is not finite.
    """
    missing = [mt for mt in module_types(specs) if mt not in adapters]
    if missing:
        raise ArtifactMismatchError(f"adapters lack module types {missing}")
    merged = copy.deepcopy(model)
    for module in merged.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "is_tagi_lora_hook", False):
                del module._forward_hooks[key]
    with torch.no_grad():
        for spec in specs:
            linear = merged.get_submodule(spec.name)
            A, B = adapters[spec.module_type]
            dt = torch.promote_types(linear.weight.dtype, torch.float32)  # bf16 / fp32 models: fp32; fp64 stays fp64
            new_w = linear.weight.to(dt) + delta_weight(A[task_index, spec.layer], B[task_index, spec.layer], scale, dt)
            if not torch.isfinite(new_w).all():
                raise ArtifactMismatchError(f"merging the adapter of task {task_index} into {spec.name} gives "
                                            "non-finite weights")
            linear.weight.copy_(new_w.to(linear.weight.dtype))
    return merged
