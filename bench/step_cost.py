"""Benchmark: pieces of the finetune step, old way vs lean way, measured side by side in one run (interleaved
repeats, medians; ratios are new / old, below 1 is faster).

    PYTHONPATH=. python bench/step_cost.py                 # CPU, tiny + mid shapes (a few minutes on 2 cores)
    PYTHONPATH=. python bench/step_cost.py --quick         # fewer repeats, tiny shapes only

1. LoRA term of one hooked linear: `reference.segmented_lora` (A/B gathered per row, two bmm) vs `grouped_lora`
   (one matmul pair per task; one bmm pair when tasks own equal rows), forward and forward+backward, for a
   finetune batch (4 tasks x 8 rows) sorted by task, interleaved, and an evaluation-like ragged batch.
2. The same inside a real step: the tiny backbone's forward+backward through every LoRA hook, per-row gather vs
   grouped (the hooks' groups made once per forward by `BatchedLoraHooks.apply`).
3. L_ins of a batch: the finetune's loop (`delta_w_distance` per task x module type) vs `l_ins_per_task` (one call
   per module type), forward+backward.
4. AdamW on a hypernetwork-sized parameter set: default (foreach) vs fused=True vs the for-loop, one step each
   (does fused work on CPU with this torch?).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tagi_ds.distill.l_ins import delta_w_distance, l_ins_per_task  # noqa: E402
from tagi_ds.kernels import reference  # noqa: E402
from tagi_ds.kernels.grouped_lora import TaskGroups, grouped_lora  # noqa: E402


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each function per repeat, runs interleaved (A B A B ...) so machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function (`interleaved`)."""
    return {k: statistics.median(v) for k, v in interleaved(fns, repeats, warmup).items()}


def row(label: str, t: dict[str, float], old: str, new: str) -> str:
    return f"{label:<52}{t[old] * 1e3:>10.3f}{t[new] * 1e3:>10.3f}{t[new] / t[old]:>8.2f}"


HEAD = f"{'':<52}{'old ms':>10}{'new ms':>10}{'ratio':>8}"


# -------------------------------------------------------------------------------------------- 1. one linear
def task_layouts(tasks: int, per_task: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sorted_ids = torch.arange(tasks).repeat_interleave(per_task)
    ragged = torch.randint(0, 3 * tasks, (tasks * per_task,), generator=g)  # eval: many tasks, few rows each
    return {"sorted": sorted_ids, "interleaved": sorted_ids[torch.randperm(len(sorted_ids), generator=g)],
            "ragged (eval-like)": ragged}


def bench_linear(shapes, repeats: int) -> None:
    print(f"\n1. LoRA term of one linear: gather per row (old) vs grouped by task (new)\n{HEAD}")
    for name, (n_tasks, per_task, T, d_in, d_out, r) in shapes.items():
        g = torch.Generator().manual_seed(0)
        for layout, tid in task_layouts(n_tasks, per_task, 0).items():
            n_all = int(tid.max()) + 1
            x = torch.randn(len(tid), T, d_in, generator=g, requires_grad=True)
            A = torch.randn(n_all, r, d_in, generator=g, requires_grad=True)
            B = torch.randn(n_all, d_out, r, generator=g, requires_grad=True)
            groups = TaskGroups.of(tid)
            w = torch.randn(len(tid), T, d_out, generator=g)

            def lora(grouped: bool) -> torch.Tensor:
                return grouped_lora(x, A, B, groups, 0.5) if grouped else reference.segmented_lora(x, A, B, tid, 0.5)

            def fwd(grouped: bool):
                with torch.no_grad():
                    return lora(grouped)

            def fwd_bwd(grouped: bool):
                torch.autograd.grad((lora(grouped) * w).sum(), [x, A, B])

            t = timed({"old": lambda: fwd(False), "new": lambda: fwd(True)}, repeats)
            note = "" if groups.order is None else " *"
            print(row(f"{name} {layout}: fwd{note}", t, "old", "new"))
            t = timed({"old": lambda: fwd_bwd(False), "new": lambda: fwd_bwd(True)}, repeats)
            print(row(f"{name} {layout}: fwd+bwd{note}", t, "old", "new"))
        t = timed({"g": lambda: TaskGroups.of(tid)}, repeats)
        print(f"{'  (TaskGroups.of, once per forward for every hook)':<52}{t['g'] * 1e3:>20.3f}")
    print("  * grouped forced for comparison: dispatch.use_groups keeps these batches on the per-row gather")


# -------------------------------------------------------------------------------------------- 2. real step
def bench_backbone(repeats: int, T: int) -> None:
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.modeling.tagi import build_student
    from tagi_ds.train.backbone_stage import ASSET_DIR

    bb, arch = load_backbone(str(ASSET_DIR), "auto")
    student = build_student(bb, arch, ["q", "k", "v", "o", "ffn_in", "ffn_out"], 8, 16.0, backend="reference")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so the LoRA term is real
        for p in student.hypernet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    pooled = torch.randn(4, student.hypernet.input_dim, generator=g)
    ids = torch.randint(3, bb.config.vocab_size, (32, T), generator=g)
    print(f"\n2. tiny backbone ({arch}, d={bb.config.hidden_size}, {len(student.specs)} hooked linears), 4 tasks x 8 "
          f"rows x {T} tokens, forward+backward to the hypernetwork\n{HEAD}")
    for layout, tid in list(task_layouts(4, 8, 1).items())[:2]:  # sorted: grouped; interleaved: the gather stays
        def step(grouped: bool):
            adapters = student.hypernet(pooled)
            with student.hooks.apply(adapters, tid):  # makes the groups; None switches the grouped path off
                a, t, groups = student.hooks.current_state()
                with student.hooks.use_state((a, t, groups if grouped else None)):
                    logits = bb(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logits.float().logsumexp(-1).mean().backward()

        t = timed({"old": lambda: step(False), "new": lambda: step(True)}, repeats)
        print(row(f"step, {layout} rows", t, "old", "new"))
    student.hooks.remove()


# -------------------------------------------------------------------------------------------- 3. L_ins
def bench_l_ins(shapes, repeats: int) -> None:
    print(f"\n3. L_ins of a batch: loop over tasks x module types (old) vs one call per module type (new), "
          f"forward+backward\n{HEAD}")
    for name, (n_tasks, layers, d, ffn, r) in shapes.items():
        g = torch.Generator().manual_seed(0)
        dims = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_in": (ffn, d), "ffn_out": (d, ffn)}
        gen = {mt: (torch.randn(n_tasks, layers, r, di, generator=g, requires_grad=True),
                    torch.randn(n_tasks, layers, do, r, generator=g, requires_grad=True))
               for mt, (do, di) in dims.items()}
        teachers = [({mt: (torch.randn(layers, r, di, generator=g), torch.randn(layers, do, r, generator=g))
                      for mt, (do, di) in dims.items()}, 2.0) for _ in range(n_tasks)]
        tokens = torch.rand(n_tasks, generator=g) * 64
        leaves = [x for ab in gen.values() for x in ab]

        def loop():
            total = None
            for j in range(n_tasks):
                dists = [delta_w_distance(A[j], B[j], 2.0, *teachers[j][0][mt], teachers[j][1])
                         for mt, (A, B) in gen.items()]
                v = torch.cat(dists).float().mean() * tokens[j]
                total = v if total is None else total + v
            torch.autograd.grad(total, leaves)

        def batched():
            torch.autograd.grad((l_ins_per_task(gen, 2.0, teachers) * tokens).sum(), leaves)

        t = timed({"old": loop, "new": batched}, repeats)
        print(row(f"{name}: {n_tasks} tasks x {layers} layers x 6 types, r={r}", t, "old", "new"))


# -------------------------------------------------------------------------------------------- 4. AdamW
def bench_adamw(sizes, repeats: int) -> None:
    print("\n4. AdamW step on CPU: default (foreach) vs fused=True vs foreach=False")
    for name, shapes in sizes.items():
        g = torch.Generator().manual_seed(0)
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        init = [torch.randn(s, generator=g) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
        opts, params = {}, {}
        for kind, kw in (("default", {}), ("fused", {"fused": True}), ("for-loop", {"foreach": False})):
            ps = [torch.nn.Parameter(v.clone()) for v in init]
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            try:
                opts[kind] = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **kw)
                opts[kind].step()
            except (RuntimeError, ValueError) as e:
                print(f"  {kind}: not usable on CPU here ({e})")
                opts.pop(kind, None)
                continue
            params[kind] = ps
        t = timed({k: o.step for k, o in opts.items()}, repeats)
        same = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(params["default"], params["fused"])) \
            if "fused" in params else float("nan")
        cells = "  ".join(f"{k} {v * 1e3:.2f} ms ({v / t['default']:.2f}x)" for k, v in t.items())
        print(f"  {name} ({n / 1e6:.1f} M params, {len(shapes)} tensors): {cells}; max |fused - default| after "
              f"the same {repeats + 3} steps: {same:.1e}")


def hypernet_shapes(hidden: int, layers: int, d: int, ffn: int, r: int) -> list[tuple[int, ...]]:
    """The hypernetwork's parameter tensors (trunk, embeddings, one head per module type), roughly."""
    heads = [(r * di + do * r, hidden) for do, di in ((d, d),) * 4 + ((ffn, d), (d, ffn))]
    trunk = [(hidden, hidden), (hidden,)] * 4 + [(hidden, d), (layers, 64), (6, 64)]
    return trunk + heads + [(h[0],) for h in heads]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer repeats, tiny shapes only")
    p.add_argument("--parts", default="1234", help="which parts to run (digits of 1-4)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    reps = 5 if a.quick else a.repeats
    print(f"torch {torch.__version__}, {a.threads} threads, {reps} interleaved repeats (medians)")
    lin = {"tiny q (128->128, r=8, T=40)": (4, 8, 40, 128, 128, 8),
           "tiny ffn_in (128->512, r=8, T=40)": (4, 8, 40, 128, 512, 8)}
    if not a.quick:
        lin["mid (1024->1024, r=16, T=128)"] = (4, 8, 128, 1024, 1024, 16)
    if "1" in a.parts:
        bench_linear(lin, reps)
    if "2" in a.parts:
        bench_backbone(reps, T=40)
    lins = {"tiny d=128 ffn=512": (4, 4, 128, 512, 8)}
    if not a.quick:
        lins["xl-like d=2048 ffn=5120"] = (4, 24, 2048, 5120, 32)
    if "3" in a.parts:
        bench_l_ins(lins, max(3, reps // 2))
    sizes = {"tiny hypernet": hypernet_shapes(256, 4, 128, 512, 8)}
    if not a.quick:
        sizes["mid hypernet"] = hypernet_shapes(256, 24, 1024, 2816, 16)
    if "4" in a.parts:
        bench_adamw(sizes, reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
