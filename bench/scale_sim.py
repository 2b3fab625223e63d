"""The REAL stages on CPU at real task counts and lengths, on a narrow backbone of real depth, against `tagi-ds plan`.

    .venv/bin/python bench/scale_sim.py                      # T5 (24 + 24 blocks) and LLaMA (32), ~20 min
    .venv/bin/python bench/scale_sim.py --quick              # T5 only, 10% of the tasks, one process per stage
    .venv/bin/python bench/scale_sim.py --arch llama --fractions 0.3 1 --no-ranks
    .venv/bin/python bench/scale_sim.py --arch llama --stages baselines  # one stage (~3 min)

Data: the SNI subset at ../shared/data/sni beside the checkout (687 train tasks, 83 test tasks), capped as
configs/t5-xl-sni.yaml / llama-sni.yaml cap it (100 instances per task; instruction / prompt 1024, input 512, target 128 tokens). Each
generated config is the real scale config (`base:`) with the narrow backbone (scale_sim_lib.ARCHS), device cpu and a
few steps. Every stage runs as a subprocess through the real CLI (`python -m tagi_ds.cli <stage> --config ...`,
torchrun for 2 gloo ranks), so this bench survives a restructuring of the stage modules. What is measured and how:
scale_sim_lib.py. Departures from the scale configs, all forced by one CPU and stated in the output:
- one teacher is trained (the task with the longest prompts, 1 step) and cached; the other units' teacher folders are
  hard links to it (finetune's L_ins and evaluate's teacher method read every unit's adapter, shapes are equal);
- finetune runs with lambda_kl=0 (the logit cache exists for one task only); KL's per-batch tensors are counted in
  the plan but not exercised here;
- the baselines (`tagi-ds baselines mode=tk_instruct`, on the engine) train 2 steps at the scale config's batch
  (baselines.tasks_per_batch x instances_per_task), on the 5 training tasks whose every prompt is over the cap
  (random draws of the whole set are mostly shorter than the widest batch, which is what the plan sizes);
- evaluate scores 1 instance per task with 1 new token (the O(tasks) structures are what is measured);
- data.seen_held_back 0 (the scale configs' 100 held-back instances are the shared subset's whole task).
Each run is compared with plan's prediction for that same config on a CPU (GPU and host parts in one process:
`cpu_device_gib`). A run the plan predicts will not fit in MemAvailable is skipped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_sim_lib import (ARCHS, REPO, SNI_DIR, Measured, build_backbone, cli, mem_available,  # noqa: E402
                           publish_teacher_copies, run_measured, save_json, torchrun, warm_extensions, write_config)

GiB = 1024 ** 3
FULL_DOCS = 2000  # data.pretrain_offline_docs of the scale configs
STAGE_GROUPS = ("teacher", "pretrain", "finetune", "baselines", "evaluate")  # --stages, in the order they run


class ArchSim:
    def __init__(self, arch: str, root: Path, args: argparse.Namespace):
        self.arch, self.root, self.args = arch, root, args
        self.backbone = build_backbone(arch, root)
        self.runs_dir = root / "runs" / arch
        self.rows: list[dict[str, Any]] = []  # plan vs measured, one per run
        self.done: dict[str, dict] = {}
        saved = root / f"results-{arch}.json"
        if args.resume and saved.is_file():  # keep the runs that finished; measure the others
            self.rows = [r for r in json.loads(saved.read_text()) if r.get("rc") == 0 or r.get("skipped")]
            self.done = {r["label"]: r for r in self.rows}

    # ---------------------------------------------------------------------------------------------- helpers
    @cached_property  # read when a stage needs it (--stages baselines does not: it reads the whole set, ~1 min)
    def train_tasks(self) -> list[str]:
        from tagi_ds.data.registry import load_run_tasks

        return [t.name for t in load_run_tasks("sni", sni_dir=str(SNI_DIR), max_instances=100)["train"]]

    @cached_property
    def teacher_task(self) -> str:
        """The training task whose median full prompt is longest: its batches are as wide as the caps allow, the
        batch the plan sizes (the plan plans the widest batch)."""
        from tagi_ds.data.prompts import build_source
        from tagi_ds.data.registry import load_run_tasks

        train = load_run_tasks("sni", sni_dir=str(SNI_DIR), max_instances=100)["train"]

        def median_chars(t) -> float:
            n = sorted(len(build_source(t, i, 2, True, None, 1024)) for i in t.instances)
            return n[len(n) // 2]
        return max(train, key=median_chars).name

    def config(self, label: str, name: str, extra: dict) -> Path:
        return write_config(self.root / "configs" / f"{self.arch}-{label}.yaml", self.arch, self.backbone,
                            self.runs_dir, name, extra)

    def run_dir(self, name: str, teachers: bool = False) -> Path:
        d = self.runs_dir / name
        d.mkdir(parents=True, exist_ok=True)
        if teachers and name != "main" and not (d / "teachers").exists():
            (d / "teachers").symlink_to(self.runs_dir / "main" / "teachers")
        return d

    def plan(self, cfg_path: Path, stage: str, ranks: int) -> dict[str, Any]:
        from tagi_ds.config import load_config
        from tagi_ds.plan.report import make_plan

        p = make_plan(sim_config(load_config(cfg_path), stage, ranks), nodes=1, gpus_per_node=ranks, stage=stage)
        return {**p["stages"][stage], "disk_this_run": disk_this_run(stage, p)}

    def measure(self, group: str, stage: str, label: str, cfg_path: Path, argv: list[str], run_dir: Path,
                tb: Optional[Path], ranks: int = 1, plan_stage: Optional[str] = None, fraction: float = 1.0,
                tasks: Optional[int] = None, stop_when: Optional[Path] = None) -> Optional[Measured]:
        if label in self.done:
            print(f"[{self.arch}] {label}: done in an earlier run (--resume)", flush=True)
            return None
        rec = self.plan(cfg_path, plan_stage or stage, ranks)
        predicted = rec["cpu_device_gib"] * GiB
        avail = mem_available()
        row = {"arch": self.arch, "group": group, "stage": stage, "plan_stage": plan_stage or stage,
               "config": str(cfg_path), "label": label, "ranks": ranks,
               "fraction": fraction, "tasks": tasks, "plan_gib": rec["cpu_device_gib"],
               "plan_gpu_gib": rec["gpu_gib"], "plan_host_gib": rec["host_gib_per_rank"],
               "plan_first_step_forwards": rec["first_step_forwards"], "plan_disk_gib": rec["disk_gib"],
               "plan_disk_this_run": rec["disk_this_run"]}
        if predicted * ranks > 0.85 * avail:
            row["skipped"] = (f"plan predicts {predicted / GiB:.1f} GiB x {ranks} process(es); only "
                              f"{avail / GiB:.1f} GiB available")
            print(f"[{self.arch}] {label}: SKIPPED: {row['skipped']}", flush=True)
            self.rows.append(row)
            return None
        print(f"[{self.arch}] {label}: running ({ranks} process(es), plan {predicted / GiB:.2f} GiB each)",
              flush=True)
        m = run_measured(label, argv, run_dir, tb, self.root / "logs" / f"{self.arch}-{label}.log", stop_when)
        row.update(rc=m.rc, seconds=round(m.seconds, 1), first_step_s=m.first_step_s,
                   measured_gib=m.worker_peak / GiB, peak_by_process={k: v / GiB for k, v in m.peak_rss.items()},
                   bytes_written=m.bytes_written, rss_series=m.series)
        print(f"[{self.arch}] {label}: rc {m.rc}, {m.seconds:.0f} s, peak {m.worker_peak / GiB:.2f} GiB "
              f"(plan {predicted / GiB:.2f}), first step "
              f"{'-' if m.first_step_s is None else f'{m.first_step_s:.1f} s'}", flush=True)
        if m.rc != 0:
            print(m.log_tail, flush=True)
        self.rows.append(row)
        save_json(self.root / f"results-{self.arch}.json", self.rows)  # as it goes: a long run can be read early
        return m

    # ---------------------------------------------------------------------------------------------- stages
    def teacher_and_cache(self, fraction: float) -> None:
        # held-back evaluation of the teacher on its task's first 4 instances, 4 new tokens (time, not memory)
        common = {"eval": {"max_new_tokens": 4}, "data": {"max_eval_instances_per_task": 4}}
        cfg = self.config("teacher", "main", common)
        rd = self.run_dir("main")
        t = self.teacher_task
        print(f"[{self.arch}] teacher task {t}", flush=True)
        self.measure("stage", "teacher", "teacher", cfg, cli("teacher", "--config", str(cfg), f"task={t}"), rd,
                     rd / "tb" / "teacher")
        self.measure("stage", "cache-logits", "cache-logits", cfg, cli("cache-logits", "--config", str(cfg),
                                                                       f"task={t}"), rd, None)
        if (rd / "teachers" / t / "adapter_model.safetensors").is_file():
            n = publish_teacher_copies(rd, t, self.train_tasks)
            print(f"[{self.arch}] published {n} teacher folders as hard links of {t}", flush=True)

    def pretrain(self, fraction: float, ranks: int = 1) -> None:
        docs = max(16, round(fraction * FULL_DOCS))
        pct = round(100 * fraction)
        name = f"pre{pct}" + (f"r{ranks}" if ranks > 1 else "")
        cfg = self.config(name, name, {"data": {"pretrain_offline_docs": docs}})
        rd = self.run_dir(name)
        argv = (torchrun(ranks, "pretrain", "--config", str(cfg)) if ranks > 1 else
                cli("pretrain", "--config", str(cfg)))
        self.measure("growth" if ranks == 1 else "stage", "pretrain", name, cfg, argv, rd, rd / "tb" / "pretrain",
                     ranks=ranks, fraction=fraction, tasks=docs)

    def finetune_name(self, fraction: float, ranks: int = 1) -> str:
        if fraction >= 1 and ranks == 1:
            return "main"
        return f"ft{round(100 * fraction)}" + (f"r{ranks}" if ranks > 1 else "")

    def finetune_cfg(self, fraction: float, name: str, label: str) -> Path:
        n = max(1, round(fraction * len(self.train_tasks)))
        return self.config(label, name, {"data": {"max_tasks": n, "max_eval_instances_per_task": 1},
                                         "finetune": {"lambda_kl": 0.0},
                                         "eval": {"methods": ["teacher", "tagi"], "max_new_tokens": 1}})

    def finetune(self, fraction: float, ranks: int = 1) -> None:
        name = self.finetune_name(fraction, ranks)
        label = f"finetune{round(100 * fraction)}" + (f"r{ranks}" if ranks > 1 else "")
        cfg = self.finetune_cfg(fraction, name, label)
        rd = self.run_dir(name, teachers=True)
        args = ("finetune", "--config", str(cfg), "variant=tagi")
        argv = torchrun(ranks, *args) if ranks > 1 else cli(*args)
        n = max(1, round(fraction * len(self.train_tasks)))
        self.measure("growth" if ranks == 1 else "stage", "finetune", label, cfg, argv, rd,
                     rd / "tb" / "finetune" / "tagi", ranks=ranks, fraction=fraction, tasks=n)

    def evaluate(self, fraction: float) -> None:
        name = self.finetune_name(fraction)
        rd = self.runs_dir / name
        if not (rd / "finetune" / "tagi" / "export" / "config.json").is_file():
            print(f"[{self.arch}] evaluate {fraction:.0%}: no finetune export in {rd}; skipped", flush=True)
            return
        label = f"evaluate{round(100 * fraction)}"
        cfg = self.finetune_cfg(fraction, name, label)
        n = max(1, round(fraction * len(self.train_tasks)))
        self.measure("growth", "evaluate", label, cfg, cli("evaluate", "--config", str(cfg)), rd, None,
                     fraction=fraction, tasks=n)

    def long_prompt_sni(self, n: int = 5) -> Path:
        """An SNI folder whose training tasks are the n with the longest SHORTEST full prompt (every prompt over the
        1,024-token cap at this vocabulary) and the real test split: the baselines draw random instances, so this is
        how their 2 measured steps see the widest batch, the one the plan sizes."""
        from tagi_ds.data.prompts import build_source
        from tagi_ds.data.registry import load_run_tasks

        out = self.root / "sni_long"
        if (out / "splits" / "train_tasks.txt").is_file():
            return out
        train = load_run_tasks("sni", sni_dir=str(SNI_DIR), max_instances=100)["train"]
        longest = sorted(train, key=lambda t: -min(len(build_source(t, i, 2, True, None, 1024))
                                                   for i in t.instances))[:n]
        (out / "tasks").mkdir(parents=True, exist_ok=True)
        (out / "splits").mkdir(exist_ok=True)
        test = (SNI_DIR / "splits" / "test_tasks.txt").read_text().split()
        for name in [t.name for t in longest] + test:
            link = out / "tasks" / f"{name}.json"
            if not link.exists():
                link.symlink_to(SNI_DIR / "tasks" / f"{name}.json")
        (out / "splits" / "train_tasks.txt").write_text("\n".join(t.name for t in longest) + "\n")
        (out / "splits" / "test_tasks.txt").write_text("\n".join(test) + "\n")
        return out

    def baselines(self) -> None:
        cfg = self.config("baselines", "bl", {"pretrain": {"enabled": False},
                                               "data": {"max_eval_instances_per_task": 1,
                                                        "sni_dir": str(self.long_prompt_sni())},
                                               "eval": {"methods": ["tk_instruct"], "max_new_tokens": 1}})
        rd = self.run_dir("bl")
        # the baselines stage on the engine (train/baselines.py) at the scale config's batch, 2 steps
        self.measure("stage", "baselines", "baselines", cfg, cli("baselines", "--config", str(cfg),
                                                                 "mode=tk_instruct"),
                     rd, rd / "tb" / "baseline_tk_instruct")

    def run_all(self) -> None:
        fr = sorted(self.args.fractions)
        top = fr[-1]
        want = set(self.args.stages)
        if "teacher" in want:
            self.teacher_and_cache(top)
        for f in fr if "pretrain" in want else ():
            self.pretrain(f)
        for f in fr if "finetune" in want else ():
            self.finetune(f)
        if not self.args.no_ranks:
            rf = self.args.ranks_fraction or top
            if "pretrain" in want:
                self.pretrain(rf, ranks=2)
            if "finetune" in want:
                self.finetune(rf, ranks=2)
        if "baselines" in want:
            self.baselines()
        for f in sorted(self.args.eval_fractions) if "evaluate" in want else ():
            self.evaluate(f)


# ------------------------------------------------------------------------------------------------ tables
def _ratio(row: dict) -> str:
    if "measured_gib" not in row or not row["plan_gib"]:
        return "-"
    return f"{row['measured_gib'] / row['plan_gib']:.2f}"


def stage_table(rows: list[dict]) -> str:
    out = [f"{'arch':<6}{'stage':<26}{'procs':>6}{'plan GPU':>9}{'plan host':>10}{'plan CPU-run':>13}"
           f"{'measured':>10}{'meas/plan':>10}{'fwd→1':>7}{'s→step1':>9}{'total s':>9}{'written MiB':>12}"
           f"{'plan MiB':>9}", "-" * 136]
    for r in rows:
        meas = f"{r['measured_gib']:.2f}" if "measured_gib" in r else "skipped"
        fs = r.get("first_step_s")
        out.append(f"{r['arch']:<6}{r['label']:<26}{r['ranks']:>6}{r['plan_gpu_gib']:>9.2f}{r['plan_host_gib']:>10.2f}"
                   f"{r['plan_gib']:>13.2f}{meas:>10}{_ratio(r):>10}"
                   f"{'-' if r['plan_first_step_forwards'] is None else r['plan_first_step_forwards']:>7}"
                   f"{'-' if fs is None else f'{fs:.1f}':>9}{r.get('seconds', '-'):>9}"
                   f"{r.get('bytes_written', 0) / 2 ** 20:>12.1f}"
                   f"{r.get('plan_disk_this_run', 0) / 2 ** 20:>9.1f}")
        if r.get("skipped"):
            out.append(f"      ^ {r['skipped']}")
        if r.get("rc"):
            out.append(f"      ^ exit code {r['rc']} (log: logs/{r['arch']}-{r['label']}.log)")
    return "\n".join(out)


def growth_table(rows: list[dict]) -> str:
    out = [f"{'arch':<6}{'stage':<10}{'tasks':>7}{'% tasks':>8}{'plan GiB':>10}{'measured GiB':>13}{'meas/plan':>10}"
           f"{'fwd→1':>7}{'s→step1':>9}{'total s':>9}", "-" * 89]
    for r in sorted((r for r in rows if r["group"] == "growth"), key=lambda r: (r["arch"], r["stage"],
                                                                                 r["fraction"])):
        meas = f"{r['measured_gib']:.2f}" if "measured_gib" in r else "skipped"
        fs = r.get("first_step_s")
        out.append(f"{r['arch']:<6}{r['stage']:<10}{r['tasks']:>7}{100 * r['fraction']:>7.0f}%{r['plan_gib']:>10.2f}"
                   f"{meas:>13}{_ratio(r):>10}"
                   f"{'-' if r['plan_first_step_forwards'] is None else r['plan_first_step_forwards']:>7}"
                   f"{'-' if fs is None else f'{fs:.1f}':>9}{r.get('seconds', '-'):>9}")
    return "\n".join(out)


def growth_summary(rows: list[dict], title: str) -> str:
    """Per arch and stage: peak RSS and seconds to the first step at the smallest and the largest fraction, and
    their ratios (the numbers issue #16 bounds: RSS <= 1.2x, first step <= 1.5x from 10% to 100%)."""
    out = [title, f"{'arch':<6}{'stage':<10}{'tasks':>14}{'RSS GiB':>16}{'RSS x':>7}{'s to step 1':>16}{'time x':>8}",
           "-" * 77]
    groups: dict = {}
    for r in rows:
        if r["group"] == "growth" and "measured_gib" in r and not r.get("rc"):
            groups.setdefault((r["arch"], r["stage"]), []).append(r)
    for (arch, stage), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["fraction"])
        lo, hi = rs[0], rs[-1]
        if lo is hi:
            continue
        tasks = f"{lo['tasks']} -> {hi['tasks']}"
        rss = f"{lo['measured_gib']:.2f} -> {hi['measured_gib']:.2f}"
        f0, f1 = lo.get("first_step_s"), hi.get("first_step_s")
        t = f"{f0:.0f} -> {f1:.0f}" if f0 is not None and f1 is not None else "-"
        tx = f"{f1 / f0:.2f}" if f0 and f1 is not None else "-"
        out.append(f"{arch:<6}{stage:<10}{tasks:>14}{rss:>16}{hi['measured_gib'] / lo['measured_gib']:>7.2f}"
                   f"{t:>16}{tx:>8}")
    return "\n".join(out)


def disk_this_run(stage: str, p: dict) -> int:
    """The plan's disk parts scaled to what one measured run writes: one teacher unit / one task's cache shard; the
    hypernetwork stages' final checkpoint (the runs stop before the first periodic one) + export; evaluate's
    predictions (of this run's instances)."""
    parts = p["stages"][stage]["disk"]
    units = max(1, p["data"]["teacher_units"])
    if stage == "teacher":
        return parts[0]["bytes"] // units
    if stage == "cache-logits":
        return parts[0]["bytes"] // max(1, p["data"]["train_tasks"])
    if stage in ("pretrain", "finetune"):
        keep = int(parts[0]["name"].split(": ")[1].split()[0])  # "<stage>: N checkpoints at the peak"
        variants = 1
        if "(x" in parts[0]["name"]:
            variants = int(parts[0]["name"].split("(x")[1].split()[0])
        return (parts[0]["bytes"] // keep + parts[1]["bytes"]) // variants
    return sum(q["bytes"] for q in parts)


def sim_config(cfg, stage: str, ranks: int):
    """The config the plan is asked about for a measured run. One change: finetune's teacher read-ahead LRU holds
    what the run has READ, at most finetune.teacher_cache_gib; the plan sizes a long run (the bound, or every
    teacher when they fit). A run of `steps` micro batches per rank reads its batches' teachers and the next one's
    (the lookahead): the plan is given that as its bound."""
    if stage == "finetune":
        from tagi_ds.plan.shapes import model_facts
        from tagi_ds.plan.structures import teacher_adapter_bytes

        f = cfg.finetune
        read = (f.steps * f.grad_accum + 1) * f.tasks_per_batch
        one = teacher_adapter_bytes(model_facts(cfg).teacher_lora_params)
        f.teacher_cache_gib = min(f.teacher_cache_gib, (read - 1) * one / GiB)
    return cfg


def replan(rows: list[dict], root: Path, stages: Optional[list[str]] = None) -> list[dict]:
    """The plan columns again, from each run's saved config (formulas changed, measurements kept); only the rows
    of `stages` when given (each plan reads the whole data set again: ~20 s a row on this machine)."""
    from tagi_ds.config import load_config
    from tagi_ds.plan.report import make_plan

    for r in rows:
        if stages and r["stage"] not in stages:
            continue
        cfg = r.get("config") or str(root / "configs" / f"{r['arch']}-{_config_label(r)}.yaml")
        stage = r.get("plan_stage") or r["stage"]
        p = make_plan(sim_config(load_config(cfg), stage, r["ranks"]), nodes=1, gpus_per_node=r["ranks"], stage=stage)
        rec = p["stages"][stage]
        r.update(plan_gib=rec["cpu_device_gib"], plan_gpu_gib=rec["gpu_gib"], plan_host_gib=rec["host_gib_per_rank"],
                 plan_first_step_forwards=rec["first_step_forwards"], plan_disk_gib=rec["disk_gib"],
                 plan_disk_this_run=disk_this_run(stage, p))
    return rows


def _config_label(row: dict) -> str:
    if row["stage"] in ("teacher", "cache-logits"):
        return "teacher"
    if row["stage"] == "baselines":
        return "baselines"
    return row["label"]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["t5", "llama"], choices=list(ARCHS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0],
                    help="fractions of the 687 train tasks (and of the 2,000 pretrain documents) for the growth runs")
    ap.add_argument("--eval-fractions", nargs="+", type=float, default=[0.1, 1.0],
                    help="fractions for evaluate (each needs the finetune of that fraction; 0.3 costs ~2 min more)")
    ap.add_argument("--stages", nargs="+", default=list(STAGE_GROUPS), choices=list(STAGE_GROUPS),
                    help="run only these (teacher = teacher + cache-logits; finetune and evaluate need the teachers, "
                         "evaluate the finetune of its fraction, in the same --out)")
    ap.add_argument("--no-ranks", action="store_true", help="skip the 2-rank (torchrun, gloo) runs")
    ap.add_argument("--ranks-fraction", type=float, default=None,
                    help="fraction of the tasks for the 2-rank runs (default: the largest of --fractions)")
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of results-<arch>.json")
    ap.add_argument("--quick", action="store_true", help="T5 only, 10%% of the tasks, no 2-rank runs")
    ap.add_argument("--out", default=str(REPO / "runs" / "scale_sim"), help="work folder (backbones, runs, logs)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's dynamic mmap threshold in the stage processes (see scale_sim_lib.py)")
    ap.add_argument("--before", default=None,
                    help="with --replan: a folder of an earlier run's results-<arch>.json (e.g. the code before a "
                         "change): its tables and growth are printed first, as measured and planned then")
    ap.add_argument("--replan-stages", nargs="+", default=None,
                    help="with --replan: only these stages' plan columns are recomputed")
    ap.add_argument("--replan", action="store_true",
                    help="measure nothing: recompute the plan columns of the saved results and print the tables")
    args = ap.parse_args(argv)
    root = Path(args.out).resolve()  # absolute: the runs' teachers/ links point into it
    if args.replan:
        rows = []
        for arch in args.arch:
            f = root / f"results-{arch}.json"
            rows += json.loads(f.read_text()) if f.is_file() else []
        if args.before:
            before = []
            for arch in args.arch:
                f = Path(args.before) / f"results-{arch}.json"
                before += json.loads(f.read_text()) if f.is_file() else []
            print(f"===== BEFORE ({args.before}: measured then, planned by the plan of then)")
            print_tables(before)
            print("\n" + growth_summary(before, "growth 10% -> 100%, BEFORE"))
            print(f"\n===== AFTER ({root}: measured now, planned by the current formulas)")
        rows = replan(rows, root, args.replan_stages)
        save_json(root / "results-replanned.json", rows)
        print_tables(rows)
        print("\n" + growth_summary(rows, "growth 10% -> 100%" + (", AFTER" if args.before else "")))
        return 0
    if args.glibc_default:
        import scale_sim_lib

        scale_sim_lib.GLIBC_FIXED_MMAP = False
    if args.quick:
        args.arch, args.fractions, args.eval_fractions, args.no_ranks = ["t5"], [0.1], [0.1], True
    t0 = time.perf_counter()
    print(f"DeepSpeed CPU comm op ready in {warm_extensions():.0f} s (built before any measured run)", flush=True)
    rows: list[dict] = []
    for arch in args.arch:
        sim = ArchSim(arch, root, args)
        print(f"[{arch}] backbone {sim.backbone}", flush=True)
        sim.run_all()
        rows += sim.rows
        save_json(root / "results.json", rows)
    print_tables(rows)
    print(f"\nscale_sim: {time.perf_counter() - t0:.0f} s; results in {root / 'results.json'}")
    return 0


def print_tables(rows: list[dict]) -> None:
    print("\nplan vs measured, per process (plan CPU-run = the plan's GPU and host parts together: on a CPU the\n"
          "device is host memory); measured = peak RSS of the largest worker process\n")
    print(stage_table(rows))
    print("\ngrowth with the number of tasks (pretrain: documents)\n")
    print(growth_table(rows))
    print("\n" + growth_summary(rows, "growth, smallest -> largest fraction"))


if __name__ == "__main__":
    sys.exit(main())
