"""Benchmark: evaluation throughput of the real evaluate code on one device, against `tagi-ds plan`'s time estimate.

    python bench/eval_throughput.py --json $OUT/eval_throughput.json     # cuda: a random ~1.1B LLaMA, bf16
    python bench/eval_throughput.py --small                              # cpu: a narrow 4-layer LLaMA (~1 minute)

What runs: the methods' own objects of `evaluate` (eval.methods.build_method → session → answer_tasks over
method_units, which is what one evaluate shard does, minus writing its file), on tasks in the SNI file format
written here with SNI-like token lengths (instruction ~240, instance input ~72, target ~8 tokens: the real subset's
mean characters / 4, data_summary.ASSUMED) and the scale config's eval settings (configs/llama-sni.yaml:
eval.batch_size, max_new_tokens, tasks_per_batch; instruction / input caps). The backbone has TinyLlama-1.1B's shape
(hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632, vocabulary 32000) with random weights, in a folder loaded
by the real `load_run_backbone`. Its tokenizer is a sentencepiece BPE trained here on the tasks' words: the model
generates ids past its vocabulary, which decode to nothing (throughput does not depend on the text). A random model
never emits EOS, so every row decodes max_new_tokens: what plan's decode-step count assumes too.
Methods:
  no_ft  the backbone reading the full Tk-Instruct prompt (instruction + instance)
  tagi   the hypernetwork method: instruction states and adapters once per task (a randomly initialised
         hypernetwork, written as a real export), the input alone decoded with the instruction as a KV prefix
Plan: `make_plan(..., stage="evaluate")` for the same config and data with one GPU, its time at plan's defaults
(100 TFLOP/s, 1500 GB/s) and at this device's ceilings measured in this run (a bf16 matrix product and a
device-to-device copy), against the measured seconds; plan's evaluate GPU peak against torch's max allocated.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing (the GPU machine has no install)

from tagi_ds.config import load_config  # noqa: E402
from tagi_ds.data.registry import load_run_tasks_from_config  # noqa: E402
from tagi_ds.data.synthetic import SuiteSplits, write_sni  # noqa: E402
from tagi_ds.data.tasks import Example, Instance, Task  # noqa: E402
from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer  # noqa: E402
from tagi_ds.eval.methods import UnitStats, answer_tasks, build_method, method_units  # noqa: E402
from tagi_ds.io_utils import atomic_write_json  # noqa: E402
from tagi_ds.modeling.tiny import tiny_llama_config  # noqa: E402
from tagi_ds.plan.report import make_plan  # noqa: E402
from tagi_ds.run.backbone import load_run_backbone  # noqa: E402
from tagi_ds.run.export_io import export_config, trainable_named_parameters, write_export  # noqa: E402
from tagi_ds.run.paths import RunPaths  # noqa: E402
from tagi_ds.train.hypernet_loop import config_student  # noqa: E402

GiB = 1024 ** 3
# TinyLlama-1.1B's shape (random weights): ~1.1e9 parameters, untied embeddings.
FULL = dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000)
# LLaMA-2-7B's shape (configs/llama-sni.yaml's backbone): --shape 7b.
LLAMA7B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
               vocab_size=32000)
SMALL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=344, vocab_size=4000)
# Token lengths of one task (SNI means: instruction Def + 2 Pos 942 chars, instance 288, label 24, at ~4 chars/token).
# A pseudo-word is ~1.8 tokens of the tokenizer trained here: these word counts give ~240 / ~72 tokens.
LENGTHS = dict(definition=95, example_input=20, example_output=4, input=30, target=4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a narrow backbone on the CPU, fp32: the same code path")
    p.add_argument("--shape", default="1b", choices=("1b", "7b"), help="the GPU backbone: TinyLlama-1.1B or "
                   "LLaMA-2-7B shaped (--small overrides)")
    p.add_argument("--config", default=str(REPO / "configs" / "llama-sni.yaml"), help="eval settings come from here")
    p.add_argument("--unseen-tasks", type=int, default=16)
    p.add_argument("--seen-tasks", type=int, default=16)
    p.add_argument("--instances", type=int, default=64, help="instances per task (data.max_eval_instances_per_task)")
    p.add_argument("--methods", default="no_ft,tagi")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list of eval.batch_size values to measure (default: the config's): a decode step's "
                        "fixed cost and its per-row cost separate across them")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here (atomic)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
def _words(n: int, rng: random.Random) -> list[str]:
    """n distinct pronounceable pseudo-words (BPE learns each as a piece or two)."""
    cons, vow = "bdfgklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(1, 3))))
    return sorted(out)


def _text(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_task(name: str, rng: random.Random, vocab: list[str], instances: int, kind: str) -> Task:
    L = LENGTHS
    examples = tuple(Example(_text(rng, vocab, L["example_input"]), _text(rng, vocab, L["example_output"]), "")
                     for _ in range(2))
    insts = tuple(Instance(f"{name}-{i}", _text(rng, vocab, L["input"]), (ref := _text(rng, vocab, L["target"]),),
                           ref) for i in range(instances))
    return Task(name, _text(rng, vocab, L["definition"]), examples, (), insts, ("Synthetic",), {"kind": kind})


def write_data(root: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """SNI-format tasks: training tasks (their held-back instances are the seen split) and unseen test tasks."""
    rng = random.Random(0)
    vocab = _words(3000, rng)
    n = args.instances
    train = [make_task(f"task{i:03d}_bench_train", rng, vocab, 2 * n, "seen") for i in range(args.seen_tasks)]
    seen_eval = [t.with_instances(t.instances[n:]) for t in train]
    train = [t.with_instances(t.instances[:n]) for t in train]
    unseen = [make_task(f"task{500 + i:03d}_bench_test", rng, vocab, n, "unseen") for i in range(args.unseen_tasks)]
    write_sni(SuiteSplits(train, seen_eval, unseen, []), root)
    corpus = [t.definition for t in train + unseen] + [i.input for t in train + unseen for i in t.instances]
    return root, corpus


# ------------------------------------------------------------------------------------------------ backbone
def write_backbone(folder: Path, corpus: list[str], shape: dict, device: torch.device, dtype: torch.dtype) -> int:
    """A random LLaMA of the benchmark's shape and a tokenizer trained on the corpus, saved as a model folder."""
    from transformers import LlamaForCausalLM

    tok = train_sentencepiece_tokenizer(corpus, folder / "tokenizer", vocab_size=min(shape["vocab_size"], 4000))
    config = tiny_llama_config(max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: 1.1e9 parameters on a CPU take a minute
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def write_random_export(cfg, bb) -> Path:
    """A hypernetwork export as finetune publishes it, of a freshly initialised student (the cost does not depend on
    what it learned)."""
    b = cfg.backbone
    torch.manual_seed(cfg.seed)
    student, r, alpha = config_student(cfg, bb.model, bb.arch)
    try:
        tensors = {n: p.detach().to("cpu", torch.float32).contiguous()
                   for n, p in trainable_named_parameters(student)}
        conf = export_config(student, backbone_id=bb.path, target_kinds=b.target_modules, r=r, alpha=alpha,
                             dtype=b.dtype, stage="finetune", variant="tagi")
        return write_export(RunPaths.of(cfg).finetune_export("tagi"), tensors, conf)
    finally:
        student.hooks.remove()  # evaluate's session wraps the same backbone again


# ------------------------------------------------------------------------------------------------ ceilings
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_ceilings(device: torch.device, dtype: torch.dtype, small: bool) -> dict[str, float]:
    """TFLOP/s of a bf16 (fp32 on CPU) matrix product and GB/s of a copy (bytes read + written), on random data."""
    n = 1024 if small else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t_mm = _median_time(lambda: a @ b, device)
    src = torch.randn((64 if small else 1024) * 2 ** 20, device=device, dtype=torch.float32)  # 256 MiB / 4 GiB
    dst = torch.empty_like(src)
    t_cp = _median_time(lambda: dst.copy_(src), device)
    return {"tflops": 2 * n ** 3 / t_mm / 1e12, "copy_gbs": 2 * src.numel() * 4 / t_cp / 1e9}


# ------------------------------------------------------------------------------------------------ measuring
def measure(cfg, name: str, splits: dict, bb, device: torch.device) -> dict:
    """One method over every eval split, as one evaluate shard answers it; a first unit's first task answered
    once untimed (cuBLAS handles, kernels' first launch)."""
    m = build_method(cfg, name, splits, bb, log=print)
    if m is None:
        raise SystemExit(f"{name}: no artifacts (bug in this bench)")
    out = {"instances": 0, "generated_rows": 0, "generated_tokens": 0, "seconds": 0.0, "batches": 0}
    with m.session():
        first = next(iter(splits.values()))
        warm = first[0].with_instances(first[0].instances[:cfg.eval.batch_size])
        answer_tasks(cfg, m, [warm], [[0]], bb, UnitStats())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for split, tasks in splits.items():
            stats = UnitStats()
            units = method_units(cfg, m, tasks)
            _sync(device)
            t0 = time.perf_counter()
            rows = answer_tasks(cfg, m, tasks, units, bb, stats,
                                on_batch=lambda k: out.__setitem__("batches", out["batches"] + 1))
            _sync(device)
            out["seconds"] += time.perf_counter() - t0
            out["instances"] += len(rows)
            out["generated_rows"] += stats.decode.rows
            out["generated_tokens"] += stats.decode.new_tokens
    if device.type == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    out["instances_per_s"] = out["instances"] / out["seconds"]
    out["tokens_per_s"] = out["generated_tokens"] / out["seconds"]
    out["ms_per_decode_step"] = 1000 * out["seconds"] / max(1, out["batches"] * cfg.eval.max_new_tokens)
    return out


def plan_seconds(cfg_path: str, overrides: list[str], method: str, ceilings: dict[str, float]) -> dict:
    """plan's evaluate stage for this config restricted to one method, on one GPU: its time at plan's defaults and
    at the measured ceilings, its GPU peak and the instances it counts."""
    cfg = load_config(cfg_path, overrides + [f"eval.methods=[{method}]"])
    default = make_plan(cfg, nodes=1, gpus_per_node=1, stage="evaluate")
    here = make_plan(cfg, nodes=1, gpus_per_node=1, stage="evaluate", throughput_tflops=ceilings["tflops"],
                     mem_bandwidth_gbs=ceilings["copy_gbs"])
    ev = here["stages"]["evaluate"]
    splits = {k: v for k, v in here["data"]["splits"].items() if k != "train"}
    return {"default_s": default["stages"]["evaluate"]["time_s"], "measured_ceilings_s": ev["time_s"],
            "gpu_gib": ev["gpu_gib"], "instances": sum(s["instances"] for s in splits.values()),
            "instr_mean": {k: round(s["instr_mean"], 1) for k, s in splits.items()},
            "input_mean": {k: round(s["input_mean"], 1) for k, s in splits.items()},
            "prompt_mean": {k: round(s["prompt_mean"], 1) for k, s in splits.items()}}


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['params'] / 1e9:.2f}B random LLaMA ({results['dtype']}), max_new_tokens "
          f"{results['eval']['max_new_tokens']}, splits (tasks, instances) {results['splits']}; plan at this device's "
          f"ceilings: {results['ceilings']['tflops']:.3g} TFLOP/s, {results['ceilings']['copy_gbs']:.3g} GB/s")
    print(f"{'method':<7} {'batch':>5} {'instances':>9} {'seconds':>8} {'inst/s':>8} {'tok/s':>9} {'ms/step':>8} "
          f"{'plan s (defaults)':>18} {'plan s (ceilings)':>18} {'measured/plan':>14} {'GiB max':>8} {'plan GiB':>8}")
    for r in results["runs"]:
        pl = r["plan"]
        print(f"{r['method']:<7} {r['batch_size']:>5} {r['instances']:>9} {r['seconds']:>8.1f} "
              f"{r['instances_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} {r['ms_per_decode_step']:>8.2f} "
              f"{pl['default_s']:>18.1f} {pl['measured_ceilings_s']:>18.1f} "
              f"{r['seconds'] / max(pl['measured_ceilings_s'], 1e-9):>14.2f} "
              f"{r.get('max_allocated_gib', float('nan')):>8.2f} {pl['gpu_gib']:>8.2f}")
        if pl["instances"] != r["instances"]:
            print(f"NOTE {r['method']}: plan counts {pl['instances']} instances, the run answered {r['instances']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="eval_throughput_")
    work = Path(args.work or tmp.name)
    t0 = time.perf_counter()
    sni, corpus = write_data(work / "sni", args)
    shape = SMALL if args.small else (LLAMA7B if args.shape == "7b" else FULL)
    params = write_backbone(work / "backbone", corpus, shape, device, dtype)
    print(f"data and a {params / 1e9:.2f}B-parameter backbone in {time.perf_counter() - t0:.0f} s", flush=True)
    overrides = [f"runs_dir={work / 'runs'}", "name=eval_throughput", f"device={device.type}",
                 "data.source=sni", f"data.sni_dir={sni}", f"data.max_eval_instances_per_task={args.instances}",
                 f"data.seen_held_back={args.instances}", f"backbone.name_or_path={work / 'backbone'}",
                 f"backbone.dtype={'bfloat16' if cuda else 'float32'}", "backbone.gradient_checkpointing=false",
                 f"eval.methods=[{args.methods}]"]
    cfg = load_config(args.config, overrides)
    splits = {k: v for k, v in load_run_tasks_from_config(cfg).items() if k != "train" and v}
    bb = load_run_backbone(cfg)
    bb.gradient_checkpointing = False
    write_random_export(cfg, bb)
    ceilings = device_ceilings(device, dtype, args.small)
    name_dev = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name_dev}: matmul {ceilings['tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbs']:.3g} GB/s",
          flush=True)
    results = {"device": name_dev, "params": params, "dtype": str(dtype), "ceilings": ceilings,
               "eval": {"max_new_tokens": cfg.eval.max_new_tokens, "tasks_per_batch": cfg.eval.tasks_per_batch},
               "splits": {k: [len(v), sum(len(t.instances) for t in v)] for k, v in splits.items()}, "runs": []}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [cfg.eval.batch_size]
    for b in batch_sizes:
        run_cfg = load_config(args.config, overrides + [f"eval.batch_size={b}"])
        for name in args.methods.split(","):
            got = measure(run_cfg, name, splits, bb, device)
            got.update(method=name, batch_size=b,
                       plan=plan_seconds(args.config, overrides + [f"eval.batch_size={b}"], name, ceilings))
            results["runs"].append(got)
            print(json.dumps(got), flush=True)
            if args.json:  # after every run: a device call cut short still returns what it measured
                atomic_write_json(args.json, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
