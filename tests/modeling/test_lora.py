"""Batched per-task LoRA hooks: equal to merging ΔW = s·B·A into the weights, per row's task."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tagi_ds.errors import ArtifactMismatchError, TagiError
from tagi_ds.modeling.backbone import target_specs
from tagi_ds.modeling.lora import BatchedLoraHooks, merge_into_copy

from tests.tiny import make_student, rand_ids, tiny_backbone
from tests.tiny import randomize_b_heads


def _plain_logits(model, arch, ids, mask, dec):
    if arch == "t5":
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    return model(input_ids=ids, attention_mask=mask).logits


def test_hooks_equal_merged_weights(arch):
    student = make_student(arch)
    randomize_b_heads(student)
    pooled = torch.randn(3, student.hypernet.input_dim, generator=torch.Generator().manual_seed(0))
    adapters = student.hypernet(pooled)
    assert all(B.abs().sum() > 0 for _, B in adapters.values())  # a real, non-zero ΔW
    ids, dec = rand_ids((4, 6), 1), rand_ids((4, 3), 2)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    task_ids = torch.tensor([2, 0, 1, 2])
    bb = student.backbone
    with torch.no_grad():
        base = _plain_logits(bb, arch, ids, mask, dec)
        with student.hooks.apply(adapters, task_ids):
            hooked = _plain_logits(bb, arch, ids, mask, dec)
        for row, t in enumerate(task_ids.tolist()):
            merged = merge_into_copy(bb, student.specs, adapters, t, student.lora_scale)
            ref = _plain_logits(merged, arch, ids[row:row + 1], mask[row:row + 1], dec[row:row + 1])
            torch.testing.assert_close(hooked[row:row + 1], ref, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(ref, base[row:row + 1], atol=1e-3)  # the adapter really changes the output
        # outside `apply` the hooks are a no-op; the merged copy carries no hooks and the original is untouched
        again = _plain_logits(bb, arch, ids, mask, dec)
    assert torch.equal(again, base)


def test_grouped_hooks_equal_the_per_row_reference(arch):
    """A task-grouped batch (tasks in any order, each task's rows together) takes the grouped path (one matmul pair
    per task, grouping made once in `apply`): logits and the gradient reaching the generated adapters equal the
    per-row gather path's."""
    from tagi_ds.kernels import dispatch
    from tagi_ds.kernels.grouped_lora import TaskGroups

    student = make_student(arch)
    randomize_b_heads(student)
    pooled = torch.randn(3, student.hypernet.input_dim, generator=torch.Generator().manual_seed(1))
    ids, dec = rand_ids((6, 5), 3), rand_ids((6, 3), 4)
    mask = torch.ones_like(ids)
    task_ids = torch.tensor([2, 2, 0, 0, 1, 1])
    assert dispatch.use_groups(TaskGroups.of(task_ids))
    bb = student.backbone
    outs = []
    for grouped in (True, False):
        adapters = {mt: (A.detach().requires_grad_(True), B.detach().requires_grad_(True))
                    for mt, (A, B) in student.hypernet(pooled).items()}
        with student.hooks.apply(adapters, task_ids):
            a, t, groups = student.hooks.current_state()
            assert groups is not None and groups.uniform
            # the same forward without the groups: dispatch falls back to the per-row gather
            with student.hooks.use_state((a, t, groups if grouped else None)):
                logits = _plain_logits(bb, arch, ids, mask, dec)
        leaves = [x for ab in adapters.values() for x in ab]
        outs.append((logits, torch.autograd.grad(logits.square().mean(), leaves)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_parameter_adapters_train_through_hooks():
    """The teacher stage: per-task LoRA as nn.Parameters, gradients reach A and B, never the backbone."""
    bb = tiny_backbone("llama")
    specs = target_specs(bb.config, ["q", "v"])
    hooks = BatchedLoraHooks(bb, specs, scale=2.0)
    n_tasks, r = 2, 4
    params = nn.ParameterDict()
    adapters = {}
    for mt in ["self.q", "self.v"]:
        s = next(x for x in specs if x.module_type == mt)
        A = nn.Parameter(torch.randn(n_tasks, 2, r, s.d_in) * 0.1)
        B = nn.Parameter(torch.zeros(n_tasks, 2, s.d_out, r))  # PEFT init: ΔW = 0
        params[mt.replace(".", "_") + "_A"], params[mt.replace(".", "_") + "_B"] = A, B
        adapters[mt] = (A, B)
    ids = rand_ids((3, 5), 4)
    with hooks.apply(adapters, torch.tensor([0, 0, 1])):
        logits = bb(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits.logsumexp(-1).mean().backward()
    for name, p in params.items():
        if name.endswith("_B"):
            assert p.grad is not None and p.grad[0].abs().sum() > 0 and p.grad[1].abs().sum() > 0, name
    assert all(p.grad is None for p in bb.parameters())
    hooks.remove()
    with hooks.apply(adapters, torch.tensor([0, 0, 1])):  # removed hooks: plain model
        again = bb(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(again, logits)


def test_apply_validates_inputs():
    student = make_student("llama", kinds=["q"])
    adapters = student.hypernet(torch.randn(2, student.hypernet.input_dim))
    ids = rand_ids((3, 4), 5)
    with pytest.raises(TagiError, match="3 rows but task_ids has 2"):
        with student.hooks.apply(adapters, torch.tensor([0, 1])):
            student.backbone(input_ids=ids)
    with pytest.raises(TagiError, match=r"indices in \[0, 2\)"):
        with student.hooks.apply(adapters, torch.tensor([0, 2, 1])):
            pass
    A, B = adapters["self.q"]
    with pytest.raises(ArtifactMismatchError, match="self.q"):
        with student.hooks.apply({"self.q": (A[:, :1], B[:, :1])}, torch.tensor([0, 1, 1])):
            pass
    with pytest.raises(ArtifactMismatchError, match="lack module type"):
        with student.hooks.apply({}, torch.tensor([0])):
            pass
    with pytest.raises(TagiError, match="re-entrant"):
        with student.hooks.apply(adapters, torch.tensor([0])):
            with student.hooks.apply(adapters, torch.tensor([0])):
                pass
    bad = {"self.q": (A, torch.full_like(B, float("inf")))}
    with pytest.raises(ArtifactMismatchError, match="non-finite"):
        merge_into_copy(student.backbone, student.specs, bad, 0, 1.0)
