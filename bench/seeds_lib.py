"""What bench/seeds.py computes from finished runs, as plain functions (tests/eval/test_seeds.py checks them by hand):
each run's scores read back from its eval/metrics.json, mean ± sd over seeds, paired differences with a two-way
bootstrap over tasks × seeds, the markdown table and the plot with error bars.

The paired difference of methods A and B is taken per (seed, task): d[s, t] = score_A[s, t] − score_B[s, t] on the
task's instances (every unseen task has the same number of instances, so the mean of d over tasks is the overall
difference). Its interval resamples tasks AND seeds with replacement (two-way bootstrap: B draws of T tasks and S
seeds, the statistic the mean of d over the drawn grid), so it covers both how much the difference depends on which
tasks were held out and on the seed; an interval above 0 means A beats B beyond both.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

METRICS = ("exact_match", "rougeL")
SHORT = {"exact_match": "EM", "rougeL": "R-L"}
# The report's order; the ablations after the methods they ablate.
ORDER = ("no_ft", "no_instruction", "tk_instruct", "teacher", "hint", "tagi", "tagi_no_kl", "tagi_no_ins",
         "tagi_no_pretrain", "tagi_no_fusion")
ABLATIONS = ("tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain", "tagi_no_fusion")


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class RunScores:
    """One finished run: per method and split, the overall scores and the per-task scores (metric → value)."""

    seed: int
    overall: dict[str, dict[str, dict[str, float]]]            # method → split → metric → value
    per_task: dict[str, dict[str, dict[str, dict[str, float]]]]  # method → split → task → metric → value
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)  # task → the teacher stage's held-back scores
    seconds: Optional[float] = None                             # the pipeline's wall-clock seconds, when recorded
    relative_flops: dict[str, float] = field(default_factory=dict)


def read_run(run_dir: Path, seed: int) -> RunScores:
    """A run folder's eval/metrics.json (and teachers/*/metrics.json, pipeline.json) as RunScores."""
    run_dir = Path(run_dir)
    path = run_dir / "eval" / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no evaluation to read ({e}); run the pipeline first") from None
    overall: dict = {}
    per_task: dict = {}
    for method, splits in data["methods"].items():
        for split, d in (splits or {}).items():
            if not d:
                continue
            overall.setdefault(method, {})[split] = {m: float(d["overall"][m]) for m in METRICS}
            per_task.setdefault(method, {})[split] = {t: {m: float(v[m]) for m in METRICS}
                                                      for t, v in d["per_task"].items()}
    teachers: dict[str, dict[str, float]] = {}
    for mpath in sorted((run_dir / "teachers").glob("*/metrics.json")):
        rec = json.loads(mpath.read_text())
        for task, scores in (rec.get("per_task") or {}).items():
            teachers[task] = {m: float(scores[m]) for m in METRICS}
    dev = run_dir / "dev.json"  # bench/seeds.py --dev: the held-out seen tasks
    if dev.is_file():
        for method, splits in json.loads(dev.read_text())["methods"].items():
            d = splits["dev"]
            overall.setdefault(method, {})["dev"] = {m: float(d["overall"][m]) for m in METRICS}
            per_task.setdefault(method, {})["dev"] = {t: {m: float(v[m]) for m in METRICS}
                                                      for t, v in d["per_task"].items()}
    seconds = None
    pj = run_dir / "pipeline.json"
    if pj.is_file():
        seconds = float(json.loads(pj.read_text()).get("seconds", 0.0)) or None
    rel = {m: float(v) for m, v in (data.get("flops", {}).get("relative") or {}).items() if v is not None}
    return RunScores(seed, overall, per_task, teachers, seconds, rel)


# ------------------------------------------------------------------------------------------------ statistics
def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, sample standard deviation with n − 1; None for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd of no values")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def bootstrap_interval(diff: np.ndarray, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of `diff` (S seeds, T tasks) under a two-way bootstrap: each draw picks S seeds
    and T tasks with replacement (numpy's default_rng(seed): first the seeds' indices, then the tasks', per draw) and
    averages diff over that grid. The interval is the (1 − level) / 2 and (1 + level) / 2 percentiles (numpy's linear
    interpolation)."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"bootstrap_interval: expected a (seeds, tasks) array, got shape {d.shape}")
    s, t = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, s, size=s)
        cols = rng.integers(0, t, size=t)
        stats[b] = d[np.ix_(rows, cols)].mean()
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(d.mean()), float(lo), float(hi)


def paired_diff(runs: Sequence[RunScores], a: str, b: str, split: str, metric: str,
                runs_b: Optional[Sequence[RunScores]] = None) -> Optional[np.ndarray]:
    """d[s, t] = a − b per seed and task of `split` (method b read from `runs_b` when given: the same method in
    another set of runs, paired by position). None when a run lacks either method."""
    other = runs_b if runs_b is not None else runs
    if len(other) != len(runs):
        raise ValueError(f"paired_diff: {len(runs)} runs against {len(other)}")
    rows = []
    for ra, rb in zip(runs, other):
        ta = ra.per_task.get(a, {}).get(split)
        tb = rb.per_task.get(b, {}).get(split)
        if ta is None or tb is None:
            return None
        if set(ta) != set(tb):
            raise ValueError(f"paired_diff: {a} and {b} were scored on different {split} tasks")
        tasks = sorted(ta)
        rows.append([ta[k][metric] - tb[k][metric] for k in tasks])
    return np.asarray(rows, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ summary
@dataclass
class Summary:
    seeds: list[int]
    methods: list[str]
    cells: dict[str, dict[str, dict[str, tuple[float, Optional[float]]]]]  # method → split → metric → (mean, sd)
    per_seed: dict[str, dict[str, dict[str, list[float]]]]                 # method → split → metric → [per seed]
    diffs: list[dict]                                                      # rows of paired differences
    teachers: list[dict]                                                   # seen: teachers vs students
    seconds: list[Optional[float]]
    diff_split: str = "unseen"                                             # where the differences are taken


def summarize(runs: Sequence[RunScores], *, splits: Sequence[str] = ("unseen", "seen"), n_boot: int = 10000,
              pairs: Optional[Sequence[tuple[str, str]]] = None, diff_split: str = "unseen") -> Summary:
    """Mean ± sd of every method over the runs, the paired differences (default: tagi − hint, tagi − tk_instruct,
    tagi − each ablation) with their bootstrap intervals on `diff_split` EM and R-L, and teachers vs students on
    seen."""
    methods = [m for m in ORDER if all(m in r.overall for r in runs)]
    cells: dict = {}
    per_seed: dict = {}
    for m in methods:
        for sp in splits:
            if not all(sp in r.overall[m] for r in runs):
                continue
            for met in METRICS:
                vals = [r.overall[m][sp][met] for r in runs]
                per_seed.setdefault(m, {}).setdefault(sp, {})[met] = vals
                cells.setdefault(m, {}).setdefault(sp, {})[met] = mean_sd(vals)
    if pairs is None:
        pairs = [("tagi", "hint"), ("tagi", "tk_instruct")] + [("tagi", a) for a in ABLATIONS]
    diffs = []
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        row = {"a": a, "b": b}
        for met in METRICS:
            d = paired_diff(runs, a, b, diff_split, met)
            if d is None:
                break
            row[met] = bootstrap_interval(d, n_boot=n_boot)
            row[f"{met}_per_seed"] = [float(x) for x in d.mean(axis=1)]
        else:
            diffs.append(row)
    return Summary([r.seed for r in runs], methods, cells, per_seed, diffs, teacher_rows(runs, methods),
                   [r.seconds for r in runs], diff_split)


def teacher_rows(runs: Sequence[RunScores], methods: Sequence[str]) -> list[dict]:
    """Seen split: the teachers' EM / R-L against each student's, mean ± sd over seeds, and on how many seen tasks
    (mean over seeds) the teacher scores at least the student's EM."""
    if "teacher" not in methods:
        return []
    rows = []
    for m in [x for x in methods if x not in ("teacher", "no_ft")]:
        if not all("seen" in r.per_task.get(m, {}) and "seen" in r.per_task["teacher"] for r in runs):
            continue
        wins, gaps = [], []
        for r in runs:
            t, s = r.per_task["teacher"]["seen"], r.per_task[m]["seen"]
            wins.append(sum(t[k]["exact_match"] >= s[k]["exact_match"] for k in t))
            gaps.append(r.overall["teacher"]["seen"]["exact_match"] - r.overall[m]["seen"]["exact_match"])
        rows.append({"student": m, "tasks": len(runs[0].per_task["teacher"]["seen"]),
                     "teacher_wins": mean_sd(wins), "em_gap": mean_sd(gaps)})
    return rows


# ------------------------------------------------------------------------------------------------ rendering
def _ms(cell: Optional[tuple[float, Optional[float]]], digits: int = 2) -> str:
    if cell is None:
        return "—"
    mean, sd = cell
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _ci(cell: tuple[float, float, float]) -> str:
    mean, lo, hi = cell
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def render_markdown(s: Summary, title: str, echo: Optional[Mapping[str, Mapping[str, float]]] = None,
                    notes: Sequence[str] = ()) -> str:
    """The seeds table (EM first), the paired differences and the teachers' seen scores against the students'."""
    n = len(s.seeds)
    lines = [f"# {title}", "", f"Seeds {', '.join(map(str, s.seeds))} (n = {n}): mean ± sd over seeds (sd with n − 1). "
             "EM leads: on this suite ROUGE-L rewards echoing the input (the echo row).", ""]
    splits = [sp for sp in ("dev", "unseen", "seen") if any(sp in s.cells.get(m, {}) for m in s.methods)]
    header = ["method"] + [f"{sp} {SHORT[m]}" for sp in splits for m in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in s.methods:
        cells = [m] + [_ms(s.cells.get(m, {}).get(sp, {}).get(met)) for sp in splits for met in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if echo:
        cells = ["*echo input*"] + [f"{echo[sp][met]:.2f}" if sp in echo else "—" for sp in splits for met in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if s.diffs:
        lines += ["", f"Paired differences on {s.diff_split} tasks, A − B per (seed, task): mean over tasks × seeds [95% two-way "
                  "bootstrap interval over tasks and seeds]; per seed in brackets after.", "",
                  "| A − B | EM | R-L | EM per seed |", "|---|---|---|---|"]
        for d in s.diffs:
            per = ", ".join(f"{x:+.2f}" for x in d["exact_match_per_seed"])
            lines.append(f"| {d['a']} − {d['b']} | {_ci(d['exact_match'])} | {_ci(d['rougeL'])} | {per} |")
    if s.teachers:
        lines += ["", "Seen split (held-back instances of the training tasks): the teachers against each student; "
                  "'teacher ≥ student' counts the seen tasks where the teacher's EM is at least the student's "
                  "(mean ± sd over seeds).", "", "| student | teacher − student seen EM | tasks with teacher ≥ "
                  "student |", "|---|---|---|"]
        for t in s.teachers:
            lines.append(f"| {t['student']} | {_ms(t['em_gap'])} | {_ms(t['teacher_wins'], 1)} of {t['tasks']} |")
    secs = [x for x in s.seconds if x]
    if secs:
        lines += ["", f"Pipeline wall-clock per seed (s): {', '.join(f'{x:.0f}' for x in secs)}; total "
                  f"{sum(secs):.0f} s ({sum(secs) / 60:.1f} min)."]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def diagnosis_markdown(diags: Sequence[Mapping]) -> list[str]:
    """The table of bench/seeds_diag.py's numbers, mean ± sd over the runs that have them."""
    diags = [d for d in diags if d]
    if not diags:
        return []
    lines = ["", "What distillation did (bench/seeds_diag.py): KL(teacher ‖ student) per label token at T = 1, and the "
             "generated ΔW against the teacher's (L_ins value, cosine, norm ratio), on the seen tasks and on the "
             "unseen paraphrases (their seen primitive's teacher), mean ± sd over seeds.", "",
             "| method | split | KL | L_ins | cos | norm |", "|---|---|---|---|---|---|"]
    methods = [m for m in ORDER if all(m in d["methods"] for d in diags)]
    for m in methods:
        for sp in ("seen", "unseen_paraphrase"):
            if not all(sp in d["methods"][m] for d in diags):
                continue
            cells = [_ms(mean_sd([d["methods"][m][sp][k] for d in diags]), 3) for k in ("kl", "l_ins", "cos", "norm")]
            lines.append(f"| {m} | {sp} | " + " | ".join(cells) + " |")
    return lines


def plot(s: Summary, path: Path, split: str = "unseen") -> bool:
    """Unseen EM and R-L per method, mean with ± sd error bars and the per-seed points; False when nothing to draw."""
    methods = [m for m in s.methods if split in s.cells.get(m, {})]
    if not methods:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(methods) + 2), 3.4))
    x = np.arange(len(methods))
    for ax, met in zip(axes, METRICS):
        means = [s.cells[m][split][met][0] for m in methods]
        sds = [s.cells[m][split][met][1] or 0.0 for m in methods]
        colors = ["tab:red" if m == "tagi" else "tab:orange" if m == "hint" else "tab:blue" for m in methods]
        ax.bar(x, means, yerr=sds, capsize=3, color=colors, alpha=0.8)
        for i, m in enumerate(methods):
            pts = s.per_seed[m][split][met]
            ax.plot([i] * len(pts), pts, "k.", ms=3)
        ax.set_xticks(x, methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{split} {SHORT[met]} (mean ± sd over {len(s.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def to_json(s: Summary) -> dict:
    out = {"seeds": s.seeds, "methods": s.methods, "seconds": s.seconds, "diffs": s.diffs, "teachers": s.teachers,
           "cells": {m: {sp: {met: {"mean": v[0], "sd": v[1]} for met, v in d.items()} for sp, d in sp_d.items()}
                     for m, sp_d in s.cells.items()},
           "per_seed": s.per_seed}
    return json.loads(json.dumps(out, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
