"""Does the instruction carry signal on the offline suite? Tk-Instruct style vs no-instruction on unseen tasks.

Both baselines train on the same seen tasks (60% primitives / 40% seen compositions) from the committed tiny backbone,
with the same steps, batch and budget; only the prompt differs (full Tk-Instruct source vs the instance part alone).
Scores: SNI ROUGE-L / exact match on unseen_paraphrase and unseen_composition (and seen_eval), with the echo
reference (answer = input) beside them. Pass: Tk-Instruct beats no-instruction by > 5 ROUGE-L on both unseen splits.

    .venv/bin/python bench/instruction_signal.py                       # LoRA and full fine-tune, 2 threads each
    .venv/bin/python bench/instruction_signal.py --methods full --jobs 1 --time-budget 100
    .venv/bin/python bench/instruction_signal.py --rescore runs/bench_instruction_signal/predictions.json

Each (method, mode) job trains in its own process with `--threads` threads; `--jobs` of them run at once, so on a
shared 2-core machine use `--jobs 1 --threads 1` and read the step counts, not the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPLITS = ("unseen_paraphrase", "unseen_composition", "seen_eval")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _eval_tasks(suite, per_split: int) -> dict:
    """The first instances of each task so that a split holds about `per_split` instances."""
    out = {}
    for split in SPLITS:
        tasks = getattr(suite, split)
        k = max(1, per_split // len(tasks))
        out[split] = [t.with_instances(t.instances[:k]) for t in tasks]
    return out


def _job(args: dict) -> dict:
    """One (method, mode): train, then predict every evaluated split. Runs in a fresh process."""
    import torch

    torch.set_num_threads(args["threads"])
    from tagi_ds.data.synthetic import build_suite, task_weights
    from tagi_ds.train.multitask import predict_multitask, train_multitask

    suite = build_suite(seed=args["seed"])
    out_dir = Path(args["out"]) / f"{args['method']}_{args['mode']}"
    lora = None if args["method"] == "full" else (args["lora_r"], 2.0 * args["lora_r"], LORA_TARGETS)
    t0 = time.perf_counter()
    train_multitask(args["backbone"], suite.train, out_dir, mode=args["mode"], steps=args["steps"], lr=args["lr"],
                    batch=args["batch"], time_budget_s=args["time_budget"], seed=args["seed"], lora=lora,
                    full=args["method"] == "full", task_weights=task_weights(suite.train, 0.6), device="cpu",
                    progress=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = {split: predict_multitask(out_dir, tasks, mode=args["mode"], device="cpu", max_new_tokens=24)
             for split, tasks in _eval_tasks(suite, args["per_split"]).items()}
    stats = json.loads((out_dir / "train.json").read_text())
    return {"method": args["method"], "mode": args["mode"], "steps": stats["steps"], "train_seconds": stats["seconds"], "job_train_seconds": round(train_s, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "loss_first10": stats["loss_first10"],
            "loss_last10": stats["loss_last10"], "predictions": preds}


def score(results: dict, seed: int, per_split: int) -> dict:
    from tagi_ds.data.synthetic import build_suite, echo_reference
    from tagi_ds.train.multitask import score_predictions

    evals = _eval_tasks(build_suite(seed=seed), per_split)
    table = {"echo": {s: echo_reference(evals[s]) for s in SPLITS}}
    for job in results["jobs"]:
        table[f"{job['method']}/{job['mode']}"] = {s: score_predictions(evals[s], job["predictions"][s]) for s in SPLITS}
    margins = {}
    for method in sorted({j["method"] for j in results["jobs"]}):
        tk, no = table.get(f"{method}/tk_instruct"), table.get(f"{method}/no_instruction")
        if tk and no:
            margins[method] = {s: round(tk[s]["rougeL"] - no[s]["rougeL"], 2) for s in SPLITS}
    return {"table": table, "margins": margins}


def _print(results: dict, scored: dict) -> None:
    print("\n| model | steps | train s | " + " | ".join(f"{s} RL / EM" for s in SPLITS) + " |")
    print("|---|---|---|" + "---|" * len(SPLITS))
    jobs = {f"{j['method']}/{j['mode']}": j for j in results["jobs"]}
    for name, row in scored["table"].items():
        j = jobs.get(name, {})
        cells = " | ".join(f"{row[s]['rougeL']:.1f} / {row[s]['exact_match']:.1f}" for s in SPLITS)
        print(f"| {name} | {j.get('steps', '-')} | {j.get('train_seconds', '-')} | {cells} |")
    for method, m in scored["margins"].items():
        ok = all(m[s] > 5 for s in ("unseen_paraphrase", "unseen_composition"))
        print(f"{method}: Tk-Instruct − no-instruction ROUGE-L: {m}  -> {'PASS' if ok else 'FAIL'} (> 5 on unseen)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="backbone folder (default: the committed tiny backbone)")
    ap.add_argument("--methods", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--steps", type=int, default=1130, help="max optimizer steps per model")
    ap.add_argument("--time-budget", type=float, default=200.0, help="seconds of training per model (lr hits 0 there)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=32, help="LoRA rank (alpha = 2r) on all linear layers")
    ap.add_argument("--per-split", type=int, default=300, help="evaluated instances per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=4, help="jobs run at once (each in its own process)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_instruction_signal"))
    ap.add_argument("--rescore", default=None, help="score a predictions.json written earlier (no training)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if a.rescore:
        results = json.loads(Path(a.rescore).read_text())
    else:
        from tagi_ds.train.backbone_stage import default_tiny_backbone_path

        backbone = a.backbone or str(default_tiny_backbone_path())
        jobs = [dict(method=m, mode=mode, backbone=backbone, steps=a.steps, time_budget=a.time_budget, batch=a.batch,
                     lr=a.lr, lora_r=a.lora_r, per_split=a.per_split, seed=a.seed, threads=a.threads, out=a.out)
                for m in a.methods.split(",") for mode in ("tk_instruct", "no_instruction")]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn")) as ex:
            done = list(ex.map(_job, jobs))
        results = {"args": vars(a), "backbone": backbone, "wall_seconds": round(time.perf_counter() - t0, 1),
                   "jobs": done}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        from tagi_ds.io_utils import atomic_write_json

        atomic_write_json(Path(a.out) / "predictions.json", results)
    try:
        scored = score(results, results["args"]["seed"], results["args"]["per_split"])
    except ImportError as e:  # e.g. rouge_score missing on a bare accelerator machine: rescore elsewhere
        print(f"not scored ({e}); rerun with --rescore {Path(a.out) / 'predictions.json'}")
        return 0
    from tagi_ds.io_utils import atomic_write_json

    atomic_write_json(Path(results["args"]["out"] if not a.rescore else Path(a.rescore).parent) / "scores.json",
                      {**scored, "jobs": [{k: v for k, v in j.items() if k != "predictions"} for j in results["jobs"]],
                       "wall_seconds": results.get("wall_seconds")})
    _print(results, scored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
