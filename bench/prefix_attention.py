"""Benchmark: the two pieces issue 20 changed in the TAGI step, old way vs new way, side by side in one run (interleaved
repeats, medians and IQR of the paired new/old ratios; below 1 is faster). Forward + backward, one thread.

1. LLaMA self-attention with the instruction prefix, one layer: the cache path (each task's prefix K/V copied to its
   rows by index_select, concatenated with the row's own K/V, SDPA with an additive mask, the backward also
   computing the discarded gradient of every row's prefix copy) vs `prefix_attention.split_prefix_attention`
   (scores against the prefix per task group, a joint softmax, no per-row copy, no prefix gradient).
2. One hooked linear's LoRA term: the old `grouped_lora` (scale on the (N, T, d_out) result, then output + term) vs
   the new one (scale on the rank-r intermediate, output added inside the last matmul).

    PYTHONPATH=. python bench/prefix_attention.py                       # the bench/train_step.py wide shapes
    PYTHONPATH=. python bench/prefix_attention.py --rows 64 --tasks 8 --heads 32 --kv-heads 8 --head-dim 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tagi_ds.kernels.grouped_lora import TaskGroups, grouped_lora  # noqa: E402
from tagi_ds.modeling.prefix_attention import prefix_fusion, split_prefix_attention  # noqa: E402

from step_cost import interleaved  # noqa: E402




def row(what: str, times: dict[str, list[float]]) -> str:
    old, new = times["old"], times["new"]
    ratios = [n / o for n, o in zip(new, old)]
    q = statistics.quantiles(ratios, n=4)
    return (f"| {what} | {statistics.median(old) * 1e3:.2f} | {statistics.median(new) * 1e3:.2f} | "
            f"{statistics.median(ratios):.3f} | {q[0]:.3f}-{q[2]:.3f} |")


def attention_fns(a) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    N, H, Hkv, T, Li, d = a.rows, a.heads, a.kv_heads, a.input_len, a.instr_len, a.head_dim
    task_ids = torch.arange(a.tasks).repeat_interleave(N // a.tasks)  # task-grouped rows, as the sampler makes them
    q, k_x, v_x = (torch.randn(N, h, T, d, generator=g).requires_grad_(True) for h in (H, Hkv, Hkv))
    k_i, v_i = torch.randn(a.tasks, Hkv, Li, d, generator=g), torch.randn(a.tasks, Hkv, Li, d, generator=g)
    instr_mask = torch.ones(a.tasks, Li, dtype=torch.long)
    instr_mask[:, Li * 3 // 4:] = 0  # bucket padding
    input_mask = torch.ones(N, T, dtype=torch.long)
    fusion = next(iter(prefix_fusion(((k_i, v_i),), instr_mask, input_mask, task_ids).values()))
    dy = torch.randn(N, H, T, d, generator=g)
    scale = d ** -0.5
    allowed = fusion.bias == 0  # (N, 1, T, Li+T) bool: what transformers' sdpa mask gives the cache path

    def old():
        k = torch.cat([k_i.index_select(0, task_ids), k_x], dim=2)  # (N, Hkv, Li+T, d): the per-row prefix copy
        v = torch.cat([v_i.index_select(0, task_ids), v_x], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=H != Hkv)
        return torch.autograd.grad(y, (q, k_x, v_x), dy)

    def new():
        y = split_prefix_attention(q, k_x, v_x, k_i, v_i, fusion.groups, fusion.bias, scale)
        return torch.autograd.grad(y, (q, k_x, v_x), dy)

    for a_, b_ in zip(old(), new()):  # the same gradients, or the timing compares different things
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-4)
    return {"old": old, "new": new}


def lora_fns(a, d_in: int, d_out: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(1)
    N, T, r = a.rows, a.input_len, a.rank
    groups = TaskGroups.of(torch.arange(a.tasks).repeat_interleave(N // a.tasks))
    x = torch.randn(N, T, d_in, generator=g).requires_grad_(True)
    W = torch.randn(d_out, d_in, generator=g) * d_in ** -0.5  # frozen base weight
    A = (torch.randn(a.tasks, r, d_in, generator=g) * 0.1).requires_grad_(True)
    B = (torch.randn(a.tasks, d_out, r, generator=g) * 0.1).requires_grad_(True)
    dy = torch.randn(N, T, d_out, generator=g)

    def old():  # the pre-issue-20 grouped_lora + hook: bmm pair, * scale on (N, T, d_out), output + term
        out = F.linear(x, W)
        h = torch.bmm(x.reshape(a.tasks, -1, d_in), A.transpose(1, 2))
        y = out + torch.bmm(h, B.transpose(1, 2)).reshape(N, T, -1) * 2.0
        return torch.autograd.grad(y, (x, A, B), dy)

    def new():
        y = grouped_lora(x, A, B, groups, 2.0, base=F.linear(x, W))
        return torch.autograd.grad(y, (x, A, B), dy)

    for a_, b_ in zip(old(), new()):
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-3)
    return {"old": old, "new": new}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=20)
    ap.add_argument("--instr-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=40)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row(f"attention, {a.rows} rows of {a.tasks} tasks, H {a.heads}/{a.kv_heads}, T {a.input_len}, "
                f"Li {a.instr_len}", interleaved(attention_fns(a), a.repeats, warmup=3))]
    for d_in, d_out in ((a.hidden, a.hidden), (a.hidden, a.ffn), (a.ffn, a.hidden)):
        rows.append(row(f"LoRA linear {d_in}->{d_out}, r {a.rank}", interleaved(lora_fns(a, d_in, d_out), a.repeats, warmup=3)))
    print(f"\nforward+backward, 1 thread, {a.repeats} interleaved repeats\n")
    print("| piece | old ms | new ms | new/old (median of pairs) | IQR |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
