"""Benchmark: per-instance inference cost of TAGI vs Tk-Instruct vs the bare backbone, measured in ONE run.

    PYTHONPATH=. python bench/inference.py                  # GPU (bf16): T5-v1.1-base-like + TinyLlama-1.1B-like
    python bench/inference.py --small                       # CPU (fp32): small configs, same lengths, ~1 minute
    python bench/inference.py --small --archs t5 --instr-lens 512 --input-len 64 --concat
                                                            # T5 cached instruction K/V vs the old concatenation

Models are random-weight backbones built from `transformers` configs (cost does not depend on the weights).
Methods, per task of n instances (instruction Li tokens, input Lx, greedy output Ly, no early stop):
  tagi          once per task: instruction encoded by the frozen backbone + hypernetwork + LoRA merged into a copy
                of the weights (the real code: TagiStudent.encode_instructions / generate_adapters, merge_into_copy);
                per instance: generation on the input alone with the merged model, the decoder attending to the
                instruction too (fusion). T5: the instruction's cross-attention K/V are projected once per task
                (fusion.t5_instruction_kv, part of the once-per-task cost) and every row attends to [them ; its
                input's K/V] (the student's cached path; analytic cache_instruction_kv=True). LLaMA: a KV prefix.
  tagi_concat   (T5, --concat) the path TAGI ran before issue 18: [instruction states ; input states] concatenated
                per row, HF's T5 projecting the instruction's K/V again in every row (cache_instruction_kv=False).
  tk_instruct   instruction + input concatenated, every instance.
  no_instr      the bare backbone on the input alone: the floor.
  tk_kv_reuse   (LLaMA only) Tk-Instruct with the instruction's KV cache computed once per task and reused.

Numbers: FLOPs analytic (tagi_ds.eval.flops) and counted (torch.utils.flop_counter, eager attention so the
attention products are counted on every device), wall time. The per-instance part is measured on one batch of
`--batch` instances of a task (median of `--reps`, the methods timed in turn) and divided by the batch; the
once-per-task part is measured separately; the cost at n instances per task is once/n + per-instance, EXTRAPOLATED
(not run 1000 times). All columns are ratios to Tk-Instruct at the same n (Tk-Instruct has no once-per-task part).
The last lines print the analytic ratio at T5-XL shapes (issue 18), priced as `evaluate` prices it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tagi_ds.eval import flops as fl  # noqa: E402
from tagi_ds.modeling.backbone import TargetSpec, freeze  # noqa: E402
from tagi_ds.modeling.backbone import target_specs  # noqa: E402
from tagi_ds.modeling.fusion import (cross_fusion_kwargs, expand_prefix, fuse_encoder_states,  # noqa: E402
                                     llama_instruction_pass, positions_from_mask, prefix_mask_and_positions,
                                     t5_instruction_kv)
from tagi_ds.modeling.known_configs import resolve_config  # noqa: E402
from tagi_ds.modeling.hf_compat import cache_kwargs, output_cache  # noqa: E402
from tagi_ds.modeling.lora import merge_into_copy  # noqa: E402
from tagi_ds.modeling.tagi import TagiStudent, build_student  # noqa: E402
from tagi_ds.modeling.tiny import tiny_llama_config, tiny_t5_config  # noqa: E402

NS = (1, 10, 100, 1000)
PAPER_TAGI_FLOPS = 0.39  # TAGI paper, SNI, FLOPs relative to Tk-Instruct
# Issue 18's T5-XL shapes (instruction / input / output tokens) and configs/t5-xl-sni.yaml's student.
XL_SHAPES = ((300, 80, 12), (500, 60, 8))
XL_STUDENT = dict(name="google/t5-xl-lm-adapt", kinds=["q", "v"], r=32, hidden=512, trunk_layers=2, embed_dim=128)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small configs, fp32 on CPU (a quick check)")
    p.add_argument("--archs", default="t5,llama", help="comma list of t5, llama")
    p.add_argument("--instr-lens", default="512,1024", help="instruction lengths in tokens (SNI: 512-1024)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=32, help="generated tokens (greedy, no early stop)")
    p.add_argument("--batch", type=int, default=8, help="instances of one task per measured batch")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (median)")
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--targets", default="q,v", help="LoRA target kinds (q,k,v,o,ffn_in,ffn_out)")
    p.add_argument("--hypernet-hidden", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda when available (bf16), else cpu (fp32)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--concat", action="store_true",
                   help="T5: also run tagi_concat, the pre-issue-18 path (instruction states concatenated per row)")
    p.add_argument("--json", default=None, help="also write the results here (atomic)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ models
def model_config(arch: str, small: bool):
    """T5 v1.1-base-like (gated-GELU, 12+12 layers, d=768) or TinyLlama-1.1B-like (22 layers, d=2048, GQA 32/4)."""
    if arch == "t5":
        if small:
            return tiny_t5_config(vocab_size=1000, d_model=128, num_layers=4, num_heads=4, d_ff=256,
                                  feed_forward_proj="gated-gelu")
        return tiny_t5_config(vocab_size=32128, d_model=768, num_layers=12, num_heads=12, d_ff=2048,
                              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                              relative_attention_max_distance=128)
    if small:
        return tiny_llama_config(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                 intermediate_size=344, max_position_embeddings=2048)
    return tiny_llama_config(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                             intermediate_size=5632, max_position_embeddings=2048, tie_word_embeddings=False)


def build_backbone(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random weights, initialised directly on `device` (a 1B model initialises in seconds on a GPU)."""
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    cls = T5ForConditionalGeneration if config.model_type == "t5" else LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return freeze(model.to(dtype))


def hf_targets(specs: list[TargetSpec]) -> list[str]:
    """HF module names (q, wi_0, q_proj, ...) of the LoRA targets, the names flops.py counts by."""
    return sorted({s.name.rsplit(".", 1)[1] for s in specs})


def hypernet_flops(student: TagiStudent) -> int:
    """Analytic forward FLOPs of the hypernetwork for one task: pooler, trunk over every (type, layer), heads."""
    hn = student.hypernet
    return fl.hypernet_flops(hn.specs, hn.input_dim, hn.r, hn.hidden, hn.trunk_layers, hn.embed_dim)


def xl_relative_flops(instr_len: int, input_len: int, out_len: int, n: int, cached: bool) -> float:
    """Analytic TAGI / Tk-Instruct per instance at T5-XL, priced as `evaluate` does (unmerged batched LoRA)."""
    x = XL_STUDENT
    config = resolve_config(x["name"])
    hyper = fl.hypernet_flops(target_specs(config, x["kinds"]), config.d_model, x["r"], x["hidden"],
                              x["trunk_layers"], x["embed_dim"])
    return fl.relative_flops("tagi", arch="t5", cfg_dict=config.to_dict(), instr_len=instr_len, input_len=input_len,
                             out_len=out_len, n_instances=n, hypernet_flops=hyper, lora_rank=x["r"],
                             lora_targets=x["kinds"], lora_mode="unmerged", cache_instruction_kv=cached)


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def greedy(model, arch: str, ids: torch.Tensor, mask: torch.Tensor, out_len: int, *,
           t5_instr: Optional[tuple[torch.Tensor, torch.Tensor]] = None, t5_instr_kv=None,
           llama_prefix: Optional[tuple] = None) -> torch.Tensor:
    """Greedy decoding of exactly out_len tokens with a KV cache, as TagiStudent.generate runs it.

    t5_instr: (states (1, Li, d), mask (1, Li)) concatenated to every row's states (the old fusion path).
    t5_instr_kv: the task's InstructionKV (projected once): every row cross-attends to [it ; its input K/V].
    llama_prefix: (prefix K/V per layer, instruction mask (1, Li)) used as a cached prefix of every row.
    """
    n = ids.shape[0]
    tids = torch.zeros(n, dtype=torch.long, device=ids.device)  # every row belongs to the one task
    toks = []
    if arch == "t5":
        states = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if t5_instr is not None:
            states, mask = fuse_encoder_states(t5_instr[0], t5_instr[1], states, mask, tids)
        cross = {} if t5_instr_kv is None else cross_fusion_kwargs(t5_instr_kv, tids, 1, mask)
        step = torch.full((n, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
        cache = None
        for _ in range(out_len):
            out = model(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=step,
                        use_cache=True, **cache_kwargs(model, cache), **cross)
            cache = output_cache(out)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(step)
        return torch.cat(toks, 1)
    if llama_prefix is not None:
        prefix, instr_mask = llama_prefix
        mask, pos = prefix_mask_and_positions(instr_mask, mask, tids)
        cache = expand_prefix(prefix, tids, model.config)
    else:
        pos, cache = positions_from_mask(mask), None
    step = ids
    for _ in range(out_len):
        out = model(input_ids=step, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache))
        cache = output_cache(out)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(step)
        mask = torch.cat([mask, torch.ones_like(step)], 1)
        pos = pos[:, -1:] + 1
    return torch.cat(toks, 1)


# ------------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_s_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds of each fn(), the fns timed in turn (one warm-up each, then rep after rep), so that a shared
    machine's load drifting during the run weighs on every method alike rather than on whichever ran last."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def counted_flops(fn: Callable[[], object], models: list) -> int:
    """FlopCounterMode total of one fn() call, with eager attention (its matmuls are counted on CPU and GPU alike;
    the fused SDPA kernels are not counted on every device)."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    finally:
        for m, impl in zip(models, saved):
            m.set_attn_implementation(impl)


@dataclass
class Cost:
    """Once-per-task and per-instance parts of one method, in FLOPs (analytic, counted) and seconds."""

    once_flops_a: float = 0.0
    per_flops_a: float = 0.0
    once_flops_c: float = 0.0
    per_flops_c: float = 0.0
    once_s: float = 0.0
    per_s: float = 0.0
    notes: list = field(default_factory=list)

    def at(self, n: int) -> tuple[float, float, float]:
        return (self.once_flops_a / n + self.per_flops_a, self.once_flops_c / n + self.per_flops_c,
                self.once_s / n + self.per_s)


def measure(arch: str, instr_len: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    config = model_config(arch, args.small)
    model = build_backbone(config, device, dtype)
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    torch.manual_seed(1)
    student = build_student(model, arch, kinds, r=args.r, alpha=args.alpha, hidden=args.hypernet_hidden,
                            fusion=True, backend="reference")
    student.hypernet.to(device)  # fp32, as trained
    with torch.no_grad():  # non-zero B so the merge is a real one (cost does not depend on it)
        for w in student.hypernet.head_weight.values():
            w.normal_(0.0, 1e-3)
    cfg_dict = config.to_dict()
    targets = hf_targets(student.specs)
    hn_flops = hypernet_flops(student)
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    instr = torch.randint(5, vocab, (1, instr_len), generator=g).to(device)
    inputs = torch.randint(5, vocab, (args.batch, args.input_len), generator=g).to(device)
    full = torch.cat([instr.expand(args.batch, -1), inputs], 1)  # Tk-Instruct: instruction + input
    ones = lambda t: torch.ones_like(t)  # noqa: E731  (no padding: every row has the same length)
    B, Ly = args.batch, args.out_len
    a = dict(arch=arch, cfg_dict=cfg_dict, instr_len=instr_len, input_len=args.input_len, out_len=Ly)

    def analytic(method: str, n: int, **kw) -> float:
        return fl.per_instance_flops(method, n_instances=n, **a, **kw)

    costs: dict[str, Cost] = {}
    per_runs: dict[str, Callable[[], object]] = {}  # each method's per-instance batch, timed round-robin at the end

    # Tk-Instruct and the floor: per instance only.
    for name, ids in (("tk_instruct", full), ("no_instr", inputs)):
        per_runs[name] = run = lambda ids=ids: greedy(model, arch, ids, ones(ids), Ly)  # noqa: E731
        method = "tk_instruct" if name == "tk_instruct" else "no_instruction"
        costs[name] = Cost(per_flops_a=analytic(method, 1), per_flops_c=counted_flops(run, [model]) / B)

    # TAGI: the real student code for the once-per-task part, then the merged model on the inputs alone.
    def tagi_once(project_kv: bool):
        enc = student.encode_instructions(instr, ones(instr))
        with torch.no_grad():
            adapters = student.generate_adapters(enc)
            merged = merge_into_copy(model, student.specs, adapters, 0, student.lora_scale)
            kv = t5_instruction_kv(merged, enc.hidden, enc.mask, torch.zeros(1, dtype=torch.long, device=device)) \
                if project_kv else None  # the merged weights carry the task's LoRA
        return enc, merged, kv

    variants = [("tagi", True)] + ([("tagi_concat", False)] if arch == "t5" and args.concat else [])
    def tagi_run(merged, enc, kv, cached: bool) -> Callable[[], object]:
        if arch == "llama":
            return lambda: greedy(merged, arch, inputs, ones(inputs), Ly, llama_prefix=(enc.prefix, enc.mask))
        if cached:
            return lambda: greedy(merged, arch, inputs, ones(inputs), Ly, t5_instr_kv=kv)
        return lambda: greedy(merged, arch, inputs, ones(inputs), Ly, t5_instr=(enc.hidden, enc.mask))

    for name, cached in variants:  # cached: T5 instruction K/V once per task (no effect on LLaMA)
        project_kv = arch == "t5" and cached
        once_s = wall_s(lambda: tagi_once(project_kv), device, max(1, args.reps))
        once_c = counted_flops(lambda: tagi_once(project_kv), [model])
        enc, merged, kv = tagi_once(project_kv)
        per_runs[name] = run = tagi_run(merged, enc, kv, cached)
        tagi_kw = dict(hypernet_flops=hn_flops, lora_rank=args.r, lora_targets=targets, lora_mode="merged",
                       cache_instruction_kv=cached)
        per_a = analytic("tagi", 10 ** 12, **tagi_kw)  # n → ∞ leaves the per-instance part
        costs[name] = Cost(once_flops_a=analytic("tagi", 1, **tagi_kw) - per_a, per_flops_a=per_a,
                           once_flops_c=once_c, per_flops_c=counted_flops(run, [merged]) / B, once_s=once_s)

    if arch == "llama":  # Tk-Instruct with the instruction's KV cache computed once per task
        once = lambda: llama_instruction_pass(model, instr, ones(instr))  # noqa: E731
        prefix = once()
        run = lambda: greedy(model, arch, inputs, ones(inputs), Ly, llama_prefix=(prefix[1], ones(instr)))  # noqa: E731
        per_runs["tk_kv_reuse"] = run
        per_a = analytic("tk_instruct_kv_reuse", 10 ** 12)
        costs["tk_kv_reuse"] = Cost(once_flops_a=analytic("tk_instruct_kv_reuse", 1) - per_a, per_flops_a=per_a,
                                    once_flops_c=counted_flops(once, [model]), per_flops_c=counted_flops(run, [model]) / B,
                                    once_s=wall_s(once, device, args.reps))

    for name, seconds in wall_s_round_robin(per_runs, device, args.reps).items():
        costs[name].per_s = seconds / B
    del per_runs  # the merged copies go with their closures

    base = costs["tk_instruct"]
    rows = {}
    for name, c in costs.items():
        rows[name] = {}
        for n in NS:
            fa, fc, t = c.at(n)
            ba, bc, bt = base.at(n)
            rows[name][n] = {"flops_analytic": fa / ba, "flops_counted": fc / bc, "time": t / bt}
    del student, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"arch": arch, "instr_len": instr_len, "params": n_params, "hidden": cfg_dict.get("d_model") or
            cfg_dict.get("hidden_size"), "layers": cfg_dict.get("num_layers") or cfg_dict.get("num_hidden_layers"),
            "targets": targets, "ratios": rows,
            "tk_per_instance": {"gflops_analytic": base.per_flops_a / 1e9, "gflops_counted": base.per_flops_c / 1e9,
                                "ms": base.per_s * 1e3},
            "counted_vs_analytic_tk": base.per_flops_c / base.per_flops_a,
            "once": {k: {"gflops_analytic": c.once_flops_a / 1e9, "gflops_counted": c.once_flops_c / 1e9,
                         "ms": c.once_s * 1e3} for k, c in costs.items() if c.once_s}}


# ------------------------------------------------------------------------------------------------ report
def format_table(res: dict, args, device, dtype) -> str:
    name = {"t5": "T5-v1.1-base-like", "llama": "TinyLlama-1.1B-like"}[res["arch"]]
    if args.small:
        name = f"small {res['arch']}"
    head = (f"\n{name} ({res['params'] / 1e6:.0f}M params, d={res['hidden']}, {res['layers']} layers), "
            f"{str(dtype).replace('torch.', '')} on {device.type}; instruction {res['instr_len']} / input "
            f"{args.input_len} / output {args.out_len} tokens; LoRA r={args.r} on {','.join(res['targets'])}; "
            f"batch {args.batch}\n"
            f"Tk-Instruct per instance: {res['tk_per_instance']['gflops_analytic']:.1f} GFLOPs analytic, "
            f"{res['tk_per_instance']['gflops_counted']:.1f} counted, {res['tk_per_instance']['ms']:.2f} ms\n")
    lines = [f"{'method':<13} {'ratio to Tk-Instruct':<16}" + "".join(f"{'n=' + str(n):>9}" for n in NS)]
    labels = {"flops_analytic": "FLOPs analytic", "flops_counted": "FLOPs counted", "time": "wall time"}
    for method, by_n in res["ratios"].items():
        for i, (key, label) in enumerate(labels.items()):
            lines.append(f"{method if i == 0 else '':<13} {label:<16}" + "".join(f"{by_n[n][key]:>9.3f}" for n in NS))
    once = "; ".join(f"{k}: {v['ms']:.1f} ms, {v['gflops_counted']:.1f} GFLOPs counted" for k, v in res["once"].items())
    return head + "\n".join(lines) + f"\nonce per task: {once}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1 if args.small else torch.get_num_threads())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.small else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    results = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        for li in [int(x) for x in args.instr_lens.split(",") if x.strip()]:
            try:
                res = measure(arch, li, args, device, dtype)
            except Exception as e:  # one failing config must not lose the others' numbers
                print(f"\n{arch} instr {li}: FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            results.append(res)
            print(format_table(res, args, device, dtype), flush=True)
            if args.json:
                write_json(args, device, dtype, results)
    print("\nPer-instance costs at n instances per task = once-per-task cost / n + per-instance cost, the "
          f"per-instance part measured on one batch of {args.batch} instances (median of {args.reps}); "
          "extrapolated, not run n times.")
    for res in results:
        for name in ("tagi", "tagi_concat"):
            if name not in res["ratios"]:
                continue
            r = res["ratios"][name][100]
            ok = "OK" if r["flops_analytic"] <= 0.4 and r["flops_counted"] <= 0.4 else "ABOVE 0.4"
            print(f"{res['arch']} instr {res['instr_len']}: {name} FLOPs at 100 instances/task = "
                  f"x{r['flops_analytic']:.3f} analytic, x{r['flops_counted']:.3f} counted, time x{r['time']:.3f} "
                  f"(paper: x{PAPER_TAGI_FLOPS} on SNI) [{ok}]")
    print("\nT5-XL (google/t5-xl-lm-adapt, LoRA r=32 on q,v unmerged, hypernet 512/2/128), analytic, 100 instances "
          "per task, TAGI / Tk-Instruct per instance:")
    for li, lx, ly in XL_SHAPES:
        print(f"  instruction {li} / input {lx} / output {ly}: x{xl_relative_flops(li, lx, ly, 100, True):.3f} as it "
              f"runs (instruction K/V once per task), x{xl_relative_flops(li, lx, ly, 100, False):.3f} with the "
              "concatenation path")
    return 0 if results else 1


def write_json(args, device, dtype, results: list) -> None:
    from tagi_ds.io_utils import atomic_write_json

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    atomic_write_json(args.json, {"args": vars(args), "device": name, "dtype": str(dtype), "results": results})


if __name__ == "__main__":
    sys.exit(main())
