"""Benchmark: whole training steps of the real stages, side by side in one process (interleaved, medians + IQR):

  ce      the finetune's CE-only step (the `hint` variant: lambda_kl = lambda_ins = 0)
  kd      the TAGI finetune step: CE + KL from the logit cache (top-k by default) + L_ins against the teachers' LoRA
  lora    the no-instruction LoRA baseline's step on the same instances (the instance input alone, same sampler)
  kd_expand (optional, --kinds) the kd step with the LLaMA prefix attention of before issue 20 (the prefix expanded
          to every row in every layer + SDPA: `TagiStudent(split_prefix=False)`): the split path's share, side by side
  kd_held (optional, --kinds) the kd step with the instruction encodings held across steps
          (finetune.encoding_cache_mib=256: every task's after its first batch), not encoded by every micro batch;
          the kd kind sets it to 0

Each step is what `engine_stage.train_stage` runs: batch built by global position, engine forward, backward, optimizer
step (fused AdamW), one thread. The teachers and their cache are written first by the real stages (a few teacher
steps: the step cost does not depend on how good they are). The ratios are what issue 20 asks for: kd / ce (<= 1.10)
and kd / lora (<= 1.3 at hidden 512, 8 layers).

    PYTHONPATH=. python bench/train_step.py                    # the demo's backbone (hidden 64) and hidden 512 x 8
    PYTHONPATH=. python bench/train_step.py --shapes tiny --steps 30
    PYTHONPATH=. python bench/train_step.py --shapes wide --steps 15 --kinds ce kd kd_expand kd_held lora
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from tagi_ds.config import load_config  # noqa: E402
from tagi_ds.data.registry import load_run_tasks_from_config  # noqa: E402
from tagi_ds.run.prompts import prompt_settings  # noqa: E402
from tagi_ds.train import baselines, cache_logits, finetune, teacher  # noqa: E402
from tagi_ds.train.distributed import global_token_mean  # noqa: E402
from tagi_ds.train.engine import Engine  # noqa: E402
from tagi_ds.train.engine_stage import setup_backbone  # noqa: E402
from tagi_ds.train.hypernet_loop import setup_student  # noqa: E402

SHAPES = {"tiny": None, "wide": dict(hidden=512, layers=8, heads=8, ffn=1376)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "wide"], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=40, help="timed steps of each kind (after 3 warm-up steps)")
    ap.add_argument("--tasks", type=int, default=8, help="training tasks (teachers + cache written for these)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--kinds", nargs="+", default=["ce", "kd", "lora"],
                    choices=["ce", "kd", "kd_expand", "kd_held", "lora"],
                    help="step kinds to time (kd and lora are always included: their ratio is the point)")
    return ap.parse_args(argv)


def backbone_dir(work: Path, shape: str) -> Path:
    from transformers import AutoTokenizer

    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config
    from tagi_ds.run.backbone_recipe import ASSET_DIR

    if SHAPES[shape] is None:
        return ASSET_DIR
    s = SHAPES[shape]
    out = work / f"backbone_{shape}"
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(ASSET_DIR)
        config = tiny_llama_config(vocab_size=len(tok), hidden_size=s["hidden"], num_layers=s["layers"],
                                   num_heads=s["heads"], intermediate_size=s["ffn"])
        build_from_config(config, seed=0).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def run_config(work: Path, shape: str, n_tasks: int, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"runs_dir={work}", f"name=step_{shape}", f"backbone.name_or_path={backbone_dir(work, shape)}",
        f"data.max_tasks={n_tasks}", "teacher.steps=3", "teacher.warmup_steps=1", "teacher.checkpoint_every=0",
        "threads=1", "finetune.encoding_cache_mib=0", *extra])  # kd encodes every step; kd_held keeps them


def engine_for(module: torch.nn.Module, cfg, out: Path) -> Engine:
    f = cfg.finetune
    return Engine(module, None, lr=f.lr, warmup_steps=1, total_steps=10 ** 6, schedule="constant",
                  weight_decay=f.weight_decay, grad_clip=f.grad_clip, use_deepspeed=False, out_dir=out, seed=cfg.seed,
                  log_dir=None, show_progress=False)


class Kind:
    """One kind of step: its engine and its batches."""

    def __init__(self, name: str, engine: Engine, batches, device, split_prefix: bool | None = None):
        self.name, self.engine, self.batches, self.device, self.position = name, engine, batches, device, 0
        self.split_prefix = split_prefix  # the shared student's LLaMA prefix path for this kind's steps
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        if self.split_prefix is not None:
            self.engine.module.student.split_prefix = self.split_prefix
        t0 = time.perf_counter()
        batch = self.batches.batch(self.position).to(self.device)
        self.position += 1
        total, n, _ = self.engine(batch)
        self.engine.backward(global_token_mean(total, n))
        self.engine.step(tokens=int(n))
        if timed:
            self.times.append(time.perf_counter() - t0)


def kinds_for(work: Path, shape: str, n_tasks: int, names=("ce", "kd", "lora")) -> list[Kind]:
    cfg = run_config(work, shape, n_tasks)
    teacher.run(cfg, progress=False, log=lambda _m: None)
    cache_logits.run(cfg, progress=False, log=lambda _m: None)
    f = cfg.finetune
    micro = f.tasks_per_batch * f.instances_per_task
    setup = setup_student(cfg, micro_batch=micro, loop=f)
    kd = finetune.build_stage(cfg, "tagi", setup, None)
    ce_cfg = run_config(work, shape, n_tasks, "finetune.lambda_kl=0", "finetune.lambda_ins=0")
    ce = finetune.build_stage(ce_cfg, "hint", setup, None)
    bb_setup = setup_backbone(cfg, micro_batch=micro, loop=cfg.baselines)  # its own copy: PEFT wraps it in place
    tasks = load_run_tasks_from_config(cfg)["train"]
    lora_batches = baselines.BaselineBatches(tasks, bb_setup.tokenizer, prompt_settings(cfg, bb_setup.arch),
                                             "no_instruction", tasks_per_batch=f.tasks_per_batch,
                                             instances_per_task=f.instances_per_task, seed=cfg.seed)
    lora = baselines.LoraStep(baselines.lora_model(bb_setup, cfg), bb_setup.arch)
    split = setup.student.split_prefix  # what the student does by default (False where the backbone has no split)
    specs = [("ce", ce.module, ce.batches, split), ("kd", kd.module, kd.batches, split)]
    if "kd_expand" in names:  # the same student and loss, the pre-issue-20 prefix attention
        kd_expand = finetune.build_stage(cfg, "tagi", setup, None)
        specs.append(("kd_expand", kd_expand.module, kd_expand.batches, False))
    if "kd_held" in names:  # the same student and loss, instruction encodings held across steps
        held_cfg = run_config(work, shape, n_tasks, "finetune.encoding_cache_mib=256")  # the config's own knob
        kd_held = finetune.build_stage(held_cfg, "tagi", setup, None)
        specs.append(("kd_held", kd_held.module, kd_held.batches, split))
    specs.append(("lora", lora, lora_batches, None))
    out = []
    for name, module, batches, split_prefix in specs:
        if name not in names:
            continue
        module.to(setup.device).train()
        out.append(Kind(name, engine_for(module, cfg, work / f"engine_{shape}_{name}"), batches, setup.device,
                        split_prefix))
    return out


def iqr(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def measure(work: Path, shape: str, args) -> dict:
    torch.set_num_threads(1)
    kinds = kinds_for(work, shape, args.tasks, set(args.kinds) | {"kd", "lora"})
    for _ in range(3):  # warm-up: first-touch allocations, the teachers' read-ahead thread
        for k in kinds:
            k.step(timed=False)
    for _ in range(args.steps):  # interleaved: machine load hits every kind alike
        for k in kinds:
            k.step(timed=True)
    return {k.name: k.times for k in kinds}


def ratio_row(shape: str, times: dict, a: str, b: str) -> str:
    per = [x / y for x, y in zip(times[a], times[b])]  # step i of a over step i of b: paired, interleaved
    lo, hi = iqr(per)
    return f"| {shape} | {a} / {b} | {statistics.median(per):.3f} | {lo:.3f}-{hi:.3f} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="train_step_"))
    rows, ratios = [], []
    for shape in args.shapes:
        times = measure(work, shape, args)
        for name, ts in times.items():
            lo, hi = iqr(ts)
            rows.append(f"| {shape} | {name} | {statistics.median(ts) * 1e3:.1f} | {lo * 1e3:.1f}-{hi * 1e3:.1f} |")
        pairs = [("kd", "ce"), ("kd", "lora"), ("ce", "lora"), ("kd", "kd_expand"), ("kd_expand", "lora"),
                 ("kd_held", "kd"), ("kd_held", "lora")]
        ratios += [ratio_row(shape, times, a, b) for a, b in pairs if a in times and b in times]
    print(f"\nsteps of each kind: {args.steps} (interleaved), 1 thread, {args.tasks} training tasks\n")
    print("| shape | step | median ms | IQR ms |\n|---|---|---|---|")
    print("\n".join(rows))
    print("\n| shape | ratio | median of paired ratios | IQR |\n|---|---|---|---|")
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
