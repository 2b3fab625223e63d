"""Seeds as a first-class run: the whole pipeline once per seed, then mean ± sd per method and ablation, the paired
TAGI − HINT difference (and TAGI − each ablation) with a two-way bootstrap interval over tasks × seeds, the teachers'
seen scores against the students', a markdown table and a plot with error bars (bench/seeds_lib.py).

    PYTHONPATH=. python bench/seeds.py --config configs/tiny.yaml --seeds 0,1,2              # ~3 x the demo
    PYTHONPATH=. python bench/seeds.py --config configs/tiny.yaml --seeds 0,1,2 --ablations  # + the 4 ablations
    PYTHONPATH=. python bench/seeds.py --config configs/tiny.yaml --seeds 0,1,2 --tag sampled cache.mode=sampled \\
        "eval.methods=[tagi]" --reuse tiny                 # another cache mode on the same teachers / pretrain
    PYTHONPATH=. python bench/seeds.py --config configs/tiny.yaml --seeds 0,1,2 --report-only  # re-aggregate
    PYTHONPATH=. python bench/seeds.py --compare tiny tiny_sampled --seeds 0,1,2 --method tagi   # A vs B, paired
    PYTHONPATH=. python bench/seeds.py --config configs/tiny.yaml --seeds 0 --dev 4 --tag lkl2 finetune.lambda_kl=2

Choosing settings (`--dev K`): the last K training tasks are held out of every stage (data.max_tasks), and after the
pipeline each method is scored on those tasks' held-back instances (split "dev", <run>/dev.json): tasks no stage
trained on, built from the seen operations and wordings. Settings are chosen on dev, never on the unseen splits.

Seed s runs as `<name>[_<tag>]_s<s>` (config `seed=s`; the task suite, data.synthetic.seed, stays fixed so tasks pair
across seeds). The frozen backbone is shared too: with backbone.name_or_path=auto every seed reads the committed
tiny backbone (seed 0's recipe), as a paper's seeds share one pretrained model; `--backbone-per-seed` builds one per
seed instead (the backbone stage: ~300 s each). A finished run is reused: the pipeline skips every stage whose marker matches. `--reuse PREFIX` first
copies the stages (teachers, pretrain, baselines and their markers) that `<PREFIX>_s<s>` finished for this run's own
identity (an override that reaches one, e.g. hypernet.encoder the pretrain's, leaves it to run again), so a second cache mode retrains only the cache and the finetune. When an option reads the multitask
model before finetune (finetune.kl_teacher / hypernet.encoder / teacher.base = multitask), the tk_instruct baseline
is trained first (the pipeline's own order puts baselines after finetune).

Writes <runs_dir>/<name>[_<tag>]_seeds/{seeds.md, seeds.json, seeds.png}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds_lib as L  # noqa: E402

from tagi_ds.config import load_config  # noqa: E402
from tagi_ds.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

ABLATION_METHODS = ["no_ft", "no_instruction", "tk_instruct", "teacher", "hint", "tagi", *L.ABLATIONS]
# What --reuse may copy: stages that the cache and finetune settings never reach (each copied only when the source
# finished it for this run's identity: `reuse`).
REUSED = {"teacher": ("teachers",), "pretrain": ("pretrain",), "baselines": ("baselines",)}


def _n_train(args, over) -> int:
    from tagi_ds.data.registry import load_run_tasks_from_config

    return len(load_run_tasks_from_config(load_config(args.config, over + ["data.max_tasks=null"]))["train"])


def run_name(base: str, tag: str | None, seed: int) -> str:
    return f"{base}{'_' + tag if tag else ''}_s{seed}"


def seed_config(args, seed: int):
    over = list(args.overrides) + [f"seed={seed}"]
    if args.dev:
        n = _n_train(args, over)
        over.append(f"data.max_tasks={n - args.dev}")
    cfg0 = load_config(args.config, over)
    over.append(f"name={run_name(args.name or cfg0.name, args.tag, seed)}")
    if args.ablations:
        over.append("eval.methods=[" + ", ".join(ABLATION_METHODS) + "]")
    if args.runs_dir:
        over.append(f"runs_dir={args.runs_dir}")
    if not args.backbone_per_seed and cfg0.backbone.name_or_path == "auto":
        from tagi_ds.run.backbone_recipe import ASSET_DIR

        over.append(f"backbone.name_or_path={ASSET_DIR}")
    return load_config(args.config, over)


def reuse(cfg, src: Path, log) -> None:
    """Copy the reusable stages of `src` into this run (never over an existing folder): those that `src` finished
    for this run's own identity (an override such as hypernet.encoder reaches the pretrain's: not copied)."""
    from tagi_ds import pipeline
    from tagi_ds.io_utils import sha256_json
    from tagi_ds.run.paths import RunPaths

    if not src.is_dir():
        raise SystemExit(f"--reuse: {src} does not exist")
    dst = cfg.run_dir
    for stage, folders in REUSED.items():
        st = pipeline.stage(stage)
        if not all(pipeline.finished(st, sub, sha256_json(pipeline.identity(cfg, st, sub)), RunPaths(src))
                   for sub in st.subs(cfg)):
            log(f"seeds: {dst.name}: {stage} not reused ({src} ran it for another configuration)")
            continue
        marker = src / ".pipeline" / f"{stage}.json"
        markers = [marker] if marker.is_file() else sorted((src / ".pipeline").glob(f"{stage}__*.json"))
        for folder in folders:
            if (src / folder).is_dir() and not (dst / folder).exists():
                shutil.copytree(src / folder, dst / folder)
                log(f"seeds: {dst.name}: reused {src / folder}")
        for mk in markers:
            (dst / ".pipeline").mkdir(parents=True, exist_ok=True)
            if not (dst / ".pipeline" / mk.name).exists():
                shutil.copy2(mk, dst / ".pipeline" / mk.name)


def needs_multitask_first(cfg) -> bool:
    f = cfg.finetune
    return ((f.lambda_kl > 0 and f.kl_teacher == "multitask") or cfg.hypernet.encoder == "multitask"
            or cfg.teacher.base == "multitask")


def run_seed(cfg, log, dev: int = 0, diagnose: bool = False) -> float:
    from tagi_ds import pipeline

    t0 = time.perf_counter()
    if needs_multitask_first(cfg):
        from tagi_ds.train import backbone_stage, baselines

        backbone_stage.run(cfg, progress=False, log=log)  # the baseline needs the run's backbone first
        baselines.run(pipeline.with_budgets(cfg), "tk_instruct", progress=False, log=log)
    pipeline.run(cfg, progress=False, log=log)
    secs = time.perf_counter() - t0  # the pipeline's (and the baseline's) time: what a seed costs
    if dev:
        dev_scores(cfg, log)
    if diagnose:
        from seeds_diag import diagnose as run_diagnosis

        run_diagnosis(cfg, log=log)
    return secs


def dev_tasks(cfg):
    """The seen tasks this run's data.max_tasks left out of training, with their held-back instances."""
    import dataclasses

    from tagi_ds.data.registry import load_run_tasks_from_config

    full = load_run_tasks_from_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_tasks=None)))
    trained = {t.name for t in load_run_tasks_from_config(cfg)["train"]}
    return [t for t in full["seen"] if t.name not in trained]


def dev_scores(cfg, log) -> dict:
    """Every evaluated method but the teachers (none exists for a held-out task) on the dev tasks → <run>/dev.json."""
    from tagi_ds.eval.evaluate import method_for
    from tagi_ds.eval.methods import UnitStats, answer_tasks, method_units
    from tagi_ds.eval.scoring import score_split
    from tagi_ds.run.backbone import load_run_backbone

    path = cfg.run_dir / "dev.json"
    if path.is_file():
        return json.loads(path.read_text())
    tasks = dev_tasks(cfg)
    if not tasks:
        raise SystemExit("--dev: no held-out seen task (data.max_tasks keeps them all)")
    bb = load_run_backbone(cfg)
    out = {"tasks": [t.name for t in tasks], "methods": {}}
    for name in cfg.eval.methods:
        m = None if name == "teacher" else method_for(cfg, name, {"dev": tasks}, bb, log)
        if m is None:
            continue
        with m.session():
            rows = answer_tasks(cfg, m, tasks, method_units(cfg, m, tasks), bb, UnitStats())
        out["methods"][name] = {"dev": score_split(tasks, [r["prediction"] for r in rows])}
        log(f"dev {name}: EM {out['methods'][name]['dev']['overall']['exact_match']:.2f} "
            f"R-L {out['methods'][name]['dev']['overall']['rougeL']:.2f}")
    atomic_write_json(path, out)
    return out


def out_dir(args, cfg0) -> Path:
    """<runs_dir>/<name>[_<tag>]_seeds, named by the config's own name (cfg0 is a seed's run, already renamed)."""
    base = args.name or load_config(args.config, list(args.overrides)).name
    return Path(args.runs_dir or cfg0.runs_dir) / f"{base}{'_' + args.tag if args.tag else ''}_seeds"


def aggregate(args, cfgs, walls: dict[int, float], log) -> Path:
    runs = [L.read_run(c.run_dir, s) for s, c in zip(args.seed_list, cfgs)]
    for r in runs:  # this invocation's wall clock when the pipeline did not record one (all stages skipped)
        r.seconds = r.seconds if r.seed not in walls else walls[r.seed]
    summary = L.summarize(runs, n_boot=args.n_boot, splits=("dev", "unseen", "seen") if args.dev else
                          ("unseen", "seen"), diff_split="dev" if args.dev else "unseen")
    echo = json.loads((cfgs[0].run_dir / "eval" / "metrics.json").read_text()).get("echo")
    out = out_dir(args, cfgs[0])
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.config}: {len(runs)} seeds" + (f" ({' '.join(args.overrides)})" if args.overrides else "")
    if args.diagnose and args.report_only:
        from seeds_diag import diagnose as run_diagnosis

        for c in cfgs:
            run_diagnosis(c, log=log)
    diags = [json.loads((c.run_dir / "diagnosis.json").read_text()) for c in cfgs
             if (c.run_dir / "diagnosis.json").is_file()]
    md = L.render_markdown(summary, title, echo) + "\n".join(L.diagnosis_markdown(diags)) + "\n"
    if L.plot(summary, out / "seeds.png"):
        md += "\n![unseen EM and R-L, mean ± sd over seeds](seeds.png)\n"
    atomic_write_text(out / "seeds.md", md)
    atomic_write_json(out / "seeds.json", {**L.to_json(summary), "runs": [str(c.run_dir) for c in cfgs],
                                           "config": args.config, "overrides": args.overrides})
    log(md)
    return out


def compare(args, log) -> None:
    """Method --method of run set A against run set B (same seeds), paired per (seed, task)."""
    a, b = args.compare
    root = Path(args.runs_dir or "runs")
    ra = [L.read_run(root / f"{a}_s{s}", s) for s in args.seed_list]
    rb = [L.read_run(root / f"{b}_s{s}", s) for s in args.seed_list]
    m = args.method
    lines = [f"# {m}: {a} vs {b}, seeds {args.seed_list}", "", "| runs | unseen EM | unseen R-L |", "|---|---|---|"]
    for name, rs in ((a, ra), (b, rb)):
        cells = [L._ms(L.mean_sd([r.overall[m]["unseen"][met] for r in rs])) for met in L.METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    cis = [L._ci(L.bootstrap_interval(L.paired_diff(ra, m, m, "unseen", met, runs_b=rb), n_boot=args.n_boot))
           for met in L.METRICS]
    lines.append(f"| {a} − {b} (paired, 95% bootstrap) | {' | '.join(cis)} |")
    log("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--ablations", action="store_true", help="also the four TAGI ablations (tiny-ablations' methods)")
    p.add_argument("--name", default=None, help="run-name prefix (default: the config's name)")
    p.add_argument("--tag", default=None, help="suffix that names this set of runs (e.g. the cache mode)")
    p.add_argument("--runs-dir", default=None, help="runs_dir override")
    p.add_argument("--reuse", default=None, help="copy teachers / pretrain / baselines from <REUSE>_s<seed> first")
    p.add_argument("--report-only", action="store_true", help="aggregate finished runs, run nothing")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two finished run sets (prefixes)")
    p.add_argument("--method", default="tagi", help="with --compare: the method compared")
    p.add_argument("--backbone-per-seed", action="store_true",
                   help="build the tiny backbone per seed (its recipe holds the seed) instead of sharing the asset")
    p.add_argument("--dev", type=int, default=0, help="hold the last DEV training tasks out and score them (split "
                   "'dev': choose settings there)")
    p.add_argument("--diagnose", action="store_true", help="also what distillation did (bench/seeds_diag.py)")
    p.add_argument("--n-boot", type=int, default=10000)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every seed")
    args = p.parse_args(argv)
    args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.compare:
        compare(args, log)
        return 0
    cfgs = [seed_config(args, s) for s in args.seed_list]
    walls: dict[int, float] = {}
    if not args.report_only:
        t_all = time.perf_counter()
        for s, cfg in zip(args.seed_list, cfgs):
            if args.reuse:
                reuse(cfg, Path(cfg.runs_dir) / f"{args.reuse}_s{s}", log)
            log(f"seeds: seed {s} -> {cfg.run_dir}")
            walls[s] = run_seed(cfg, log, args.dev, args.diagnose)
            log(f"seeds: seed {s} done in {walls[s]:.0f} s")
        log(f"seeds: {len(cfgs)} seed(s) in {time.perf_counter() - t_all:.0f} s")
    out = aggregate(args, cfgs, walls, log)
    log(f"seeds: table in {out / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
