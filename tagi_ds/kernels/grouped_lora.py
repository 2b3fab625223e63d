"""The LoRA term by task groups: one matmul pair per task over all of its rows, no per-row copy of A and B.

`reference.segmented_lora` gathers A_t and B_t once per batch row ((N, r, d_in) + (N, d_out, r) copies, made again
by every hooked linear) and runs two batched matmuls of N small products. Rows of one task share their adapter, so
here the rows are grouped by task once per forward (`TaskGroups.of`, in `BatchedLoraHooks.apply`) and each hook
runs, per task, (rows_t * T, d_in) @ A_t^T @ B_t^T; when every task owns the same number of rows the groups are one
(n_groups, rows * T, d_in) tensor and the whole term is two bmm calls. Same result as the reference (fp32 rounding
aside), the same gradients (plain autograd), any task order in the batch (interleaved rows are permuted into groups
and back; `dispatch.use_groups` keeps those batches on the gather, which is as fast there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TaskGroups:
    """The batch's rows grouped by task, computed once per forward (one device-to-host copy of the task ids).

    tasks: task id of each group (order of first appearance); counts: rows of each group; order: a permutation
    putting each group's rows together (None when they already are); inverse: its inverse.
    """

    tasks: tuple[int, ...]
    counts: tuple[int, ...]
    order: Optional[torch.Tensor]  # (N,) long
    inverse: Optional[torch.Tensor]  # (N,) long
    task_index: torch.Tensor  # (n_groups,) long, `tasks` on the rows' device

    @property
    def uniform(self) -> bool:
        """Every group has the same number of rows: the groups are one batched matmul."""
        return len(set(self.counts)) == 1

    @staticmethod
    def of(task_ids: torch.Tensor) -> "TaskGroups":
        ids = [int(t) for t in task_ids.tolist()]  # (N,) on the host: one sync for the whole forward
        first: dict[int, int] = {}
        for t in ids:
            first.setdefault(t, len(first))
        tasks = tuple(first)
        counts = tuple(ids.count(t) for t in tasks)
        grouped = sorted(range(len(ids)), key=lambda i: (first[ids[i]], i))  # stable: rows keep their order
        dev = task_ids.device
        if grouped == list(range(len(ids))):
            order = inverse = None
        else:
            order = torch.tensor(grouped, dtype=torch.long, device=dev)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(ids), device=dev)
        return TaskGroups(tasks, counts, order, inverse, torch.tensor(tasks, dtype=torch.long, device=dev))


def grouped_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups: TaskGroups,
                 scale: float, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s * (x @ A_t^T) @ B_t^T per row, rows grouped by `groups` (of the same task ids as `reference.segmented_lora`);
    with `base` (N, T, d_out), base + that term.

    x: (N, T, d_in); A: (n_tasks, r, d_in); B: (n_tasks, d_out, r) (strided views are fine). Returns (N, T, d_out)
    in x's dtype. The scale multiplies the rank-r intermediate (N, T, r), not the (N, T, d_out) result, and on
    uniform groups in batch order `base` is added by the second matmul itself (baddbmm): no extra pass over
    (N, T, d_out) tensors in the forward or the backward, which for a hooked linear cost as much as the bmm pair.
    """
    N, T, d_in = x.shape
    xs = x if groups.order is None else x.index_select(0, groups.order)  # (N, T, d_in), grouped
    if groups.uniform:
        G, c = len(groups.tasks), groups.counts[0]
        all_tasks = groups.tasks == tuple(range(A.shape[0]))
        a = (A if all_tasks else A.index_select(0, groups.task_index)).to(x.dtype)  # (G, r, d_in): per task, not row
        b = (B if all_tasks else B.index_select(0, groups.task_index)).to(x.dtype)  # (G, d_out, r)
        h = torch.bmm(xs.reshape(G, c * T, d_in), a.transpose(1, 2)) * scale  # (G, c*T, r)
        if base is not None and groups.order is None and base.dtype == x.dtype:
            return torch.baddbmm(base.reshape(G, c * T, -1), h, b.transpose(1, 2)).view(N, T, -1)
        y = torch.bmm(h, b.transpose(1, 2)).reshape(N, T, -1)  # (N, T, d_out)
    else:
        parts, start = [], 0
        for t, c in zip(groups.tasks, groups.counts):
            xt = xs[start:start + c].reshape(c * T, d_in)
            parts.append(((xt @ A[t].to(x.dtype).T * scale) @ B[t].to(x.dtype).T).reshape(c, T, -1))
            start += c
        y = torch.cat(parts)  # (N, T, d_out)
    y = y if groups.inverse is None else y.index_select(0, groups.inverse)
    return y if base is None else base + y.to(base.dtype)
