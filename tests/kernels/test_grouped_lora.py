"""The grouped LoRA path (one matmul pair per task) against the per-row gather reference: outputs and gradients, for
sorted, interleaved, unequal and partial task sets, and the dispatch that picks it."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.kernels import dispatch, reference
from tagi_ds.kernels.grouped_lora import TaskGroups, grouped_lora

N_TASKS, R, D_IN, D_OUT, T = 4, 4, 24, 20, 5
CASES = {
    "sorted uniform": [0, 0, 1, 1, 2, 2, 3, 3],
    "interleaved uniform": [3, 1, 0, 2, 1, 3, 2, 0],
    "subset uniform": [2, 0, 2, 0],
    "unequal unsorted": [1, 1, 1, 0, 3, 1, 3, 0, 1],
    "one task": [2, 2, 2],
    "one row": [1],
}


def tensors(task_ids: list[int], seed: int = 0, strided: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(task_ids), T, D_IN, generator=g)
    if strided:  # A/B as the hooks see them: one layer of (n_tasks, n_layers, ...) hypernetwork outputs
        A = torch.randn(N_TASKS, 3, R, D_IN, generator=g)[:, 1]
        B = torch.randn(N_TASKS, 3, D_OUT, R, generator=g)[:, 1]
    else:
        A, B = torch.randn(N_TASKS, R, D_IN, generator=g), torch.randn(N_TASKS, D_OUT, R, generator=g)
    return x, A, B, torch.tensor(task_ids)


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_equals_the_reference_with_gradients(name):
    ids = CASES[name]
    for strided in (False, True):
        x, A, B, tid = tensors(ids, seed=len(ids), strided=strided)
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
        ref_leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
        groups = TaskGroups.of(tid)
        y = grouped_lora(*leaves, groups, 0.7)
        y_ref = reference.segmented_lora(*ref_leaves, tid, 0.7)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(y)  # a generic upstream gradient
        grads = torch.autograd.grad((y * w).sum(), leaves)
        grads_ref = torch.autograd.grad((y_ref * w).sum(), ref_leaves)
        for g, gr, what in zip(grads, grads_ref, "xAB"):
            torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5, msg=f"{name}: grad of {what}")


@pytest.mark.parametrize("name", list(CASES))
def test_base_is_added_with_its_gradient_float64(name):
    """grouped_lora(..., base=out) = out + the LoRA term (fused into the last matmul when the rows are grouped in
    order and uniform; otherwise added), values and gradients of base, x, A and B, in float64."""
    x, A, B, tid = (t.double() if t.is_floating_point() else t for t in tensors(CASES[name], seed=3, strided=True))
    base = torch.randn(x.shape[0], T, D_OUT, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (base, x, A, B)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (base, x, A, B)]
    y = dispatch.segmented_lora(*leaves[1:], tid, 0.7, backend="reference", groups=TaskGroups.of(tid),
                                base=leaves[0])
    y_ref = ref_leaves[0] + reference.segmented_lora(*ref_leaves[1:], tid, 0.7)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for g, gr, what in zip(torch.autograd.grad((y * w).sum(), leaves),
                           torch.autograd.grad((y_ref * w).sum(), ref_leaves), ("base", "x", "A", "B")):
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12, msg=f"{name}: grad of {what}")


def test_groups_record_order_counts_and_uniformity():
    g = TaskGroups.of(torch.tensor(CASES["interleaved uniform"]))
    assert g.tasks == (3, 1, 0, 2) and g.counts == (2, 2, 2, 2) and g.uniform
    assert g.order.tolist() == [0, 5, 1, 4, 2, 7, 3, 6]
    assert torch.equal(g.order[g.inverse], torch.arange(8))
    s = TaskGroups.of(torch.tensor(CASES["sorted uniform"]))
    assert s.order is None and s.inverse is None
    u = TaskGroups.of(torch.tensor(CASES["unequal unsorted"]))
    assert u.counts == (5, 2, 2) and not u.uniform


def test_dispatch_takes_the_grouped_path_only_with_groups_worth_it():
    x, A, B, tid = tensors([1, 1, 3, 3, 0, 0, 2, 2])  # tasks together, in any task order: grouped
    groups = TaskGroups.of(tid)
    assert dispatch.use_groups(groups) and groups.order is None
    got = dispatch.segmented_lora(x, A, B, tid, 0.5, backend="reference", groups=groups)
    torch.testing.assert_close(got, grouped_lora(x, A, B, groups, 0.5), rtol=0, atol=0)  # bit-equal: same path
    torch.testing.assert_close(got, reference.segmented_lora(x, A, B, tid, 0.5), rtol=1e-5, atol=1e-5)
    # interleaved rows, or many tasks with a row each (evaluation sorted by length): the per-row gather stays
    assert not dispatch.use_groups(TaskGroups.of(torch.tensor(CASES["interleaved uniform"])))
    assert not dispatch.use_groups(TaskGroups.of(torch.tensor([0, 1, 2, 2])))  # unequal, 1-2 rows a task
    assert dispatch.use_groups(TaskGroups.of(torch.tensor([0, 1, 2, 3])))  # equal: one bmm pair, no gather
    ragged = torch.tensor([0, 1, 2, 3, 0])
    assert not dispatch.use_groups(TaskGroups.of(ragged))
    x5 = x[:5]
    got = dispatch.segmented_lora(x5, A, B, ragged, 0.5, backend="reference", groups=TaskGroups.of(ragged))
    assert torch.equal(got, reference.segmented_lora(x5, A, B, ragged, 0.5))
    with pytest.raises(ValueError, match="groups cover 8 rows, x has 5"):
        dispatch.segmented_lora(x5, A, B, ragged, 0.5, backend="reference", groups=groups)


def test_bfloat16_input_keeps_its_dtype():
    x, A, B, tid = tensors(CASES["interleaved uniform"])
    y = grouped_lora(x.bfloat16(), A, B, TaskGroups.of(tid), 1.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.segmented_lora(x.bfloat16(), A, B, tid, 1.0).float(),
                               rtol=2e-2, atol=2e-2)
