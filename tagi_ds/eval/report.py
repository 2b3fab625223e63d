"""The evaluation report a person reads: report.json (machine), report.md (tables + plots), PNG plots.

report.json is exactly `{method: {"unseen", "unseen_paraphrase", "unseen_composition", "seen": {"rougeL",
"exact_match"} | null, "relative_flops": float | null}}`: a method with no number for a split gets null, never a
made-up 0. Everything is published atomically (tagi_ds.io_utils), so a reader never sees half a report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.io_utils import atomic_path, atomic_write_json, atomic_write_text

METHODS: tuple[str, ...] = ("no_ft", "no_instruction", "tk_instruct", "teacher", "hint", "tagi",
                            "tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain", "tagi_no_fusion")
SPLITS: tuple[str, ...] = ("unseen", "unseen_paraphrase", "unseen_composition", "seen")
METRICS: tuple[str, ...] = ("rougeL", "exact_match")
# Optional per-method inputs that go to report.md only (not to report.json).
_MD_ONLY = ("time_s",)
BAR_PLOT = "unseen_rougeL.png"
EM_PLOT = "unseen_em.png"
CURVES_PLOT = "training_curves.png"


def _num(x: Any, where: str) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ConfigError(f"report: {where} must be a finite number or null, got {x!r}")
    return float(x)


def _split_entry(v: Any, where: str) -> Optional[dict[str, Optional[float]]]:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(f"report: {where} must be a mapping with {list(METRICS)} or null, got {type(v).__name__}")
    extra = set(v) - set(METRICS)
    if extra:
        raise ConfigError(f"report: {where} has unknown metric(s) {sorted(extra)}; expected {list(METRICS)}")
    entry = {m: _num(v.get(m), f"{where}.{m}") for m in METRICS}
    return None if all(x is None for x in entry.values()) else entry


def normalize_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The report.json object: known methods only, every split and relative_flops present (null when missing)."""
    out: dict[str, dict[str, Any]] = {}
    for method, r in results.items():
        if method not in METHODS:
            raise ConfigError(f"report: unknown method {method!r}; expected some of {list(METHODS)}")
        if not isinstance(r, Mapping):
            raise ConfigError(f"report: results[{method!r}] must be a mapping, got {type(r).__name__}")
        extra = set(r) - set(SPLITS) - {"relative_flops"} - set(_MD_ONLY)
        if extra:
            raise ConfigError(f"report: results[{method!r}] has unknown key(s) {sorted(extra)}; expected "
                              f"{list(SPLITS)} + ['relative_flops'] (+ {list(_MD_ONLY)} for the markdown)")
        entry: dict[str, Any] = {s: _split_entry(r.get(s), f"results[{method!r}][{s!r}]") for s in SPLITS}
        entry["relative_flops"] = _num(r.get("relative_flops"), f"results[{method!r}]['relative_flops']")
        out[method] = entry
    return out


def _ordered(methods: Sequence[str]) -> list[str]:
    return [m for m in METHODS if m in methods]


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_unseen_bar(report: Mapping[str, Mapping[str, Any]], path: Path, metric: str = "rougeL") -> bool:
    """Bar chart of an unseen metric per method; False (no file) when no method has the number."""
    methods = [m for m in _ordered(list(report)) if (report[m]["unseen"] or {}).get(metric) is not None]
    if not methods:
        return False
    plt = _plt()
    vals = [report[m]["unseen"][metric] for m in methods]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(methods) + 1.5), 3.2))
    bars = ax.bar(methods, vals, color=["tab:red" if m == "tagi" else "tab:blue" for m in methods])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel(f"{'exact match' if metric == 'exact_match' else 'ROUGE-L'} (unseen tasks)")
    ax.tick_params(axis="x", labelrotation=30)
    _save_png(fig, path)
    plt.close(fig)
    return True


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: Path) -> bool:
    """One panel per curve name (losses live on different scales); False when there is nothing to draw."""
    named = {k: v for k, v in curves.items() if v}
    if not named:
        return False
    plt = _plt()
    n = len(named)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, pts) in zip(axes.flat, named.items()):
        try:
            steps, vals = zip(*[(float(p[0]), float(p[1])) for p in pts])
        except (TypeError, IndexError, ValueError) as e:
            raise ConfigError(f"report: curve {name!r} must be a list of (step, value) pairs ({e})") from None
        ax.plot(steps, vals, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Mapping[str, Any]], timings: Mapping[str, float],
                    echo: Optional[Mapping[str, Any]], extra_tables: Mapping[str, Sequence[Mapping[str, Any]]],
                    plots: Sequence[tuple[str, str]], title: str, notes: Sequence[str] = (),
                    split_labels: Optional[Mapping[str, str]] = None) -> str:
    splits = [s for s in SPLITS if any(report[m][s] is not None for m in report) or (echo or {}).get(s)]
    label = {s: (split_labels or {}).get(s, s) for s in splits}
    # EM leads: on short-answer suites ROUGE-L gives partial credit for echoing the input's words (the echo row);
    # ROUGE-L stays beside it, as SNI reports it.
    header = ["method"] + [f"{label[s]} {lab}" for s in splits for lab in ("EM", "R-L")] + ["rel. FLOPs",
                                                                                           "time/inst (s)"]
    rows = []
    for m in _ordered(list(report)):
        cells = [m]
        for s in splits:
            e = report[m][s] or {}
            cells += [_fmt(e.get("exact_match")), _fmt(e.get("rougeL"))]
        cells += [_fmt(report[m]["relative_flops"], 3), _fmt(timings.get(m), 4)]
        rows.append(cells)
    if echo:
        cells = ["*echo input (reference)*"]
        for s in splits:
            e = echo.get(s) or {}
            cells += [_fmt(e.get("exact_match")), _fmt(e.get("rougeL"))]
        rows.append(cells + ["—", "—"])
    parts = [f"# {title}", "",
             "Exact match (EM) first, ROUGE-L (R-L) beside it, as SNI's official script computes them (×100): "
             "ROUGE-L gives partial credit for repeating the input's words, which the echo row (every answer = "
             "its input) measures; EM does not. Relative FLOPs are analytic per-instance inference FLOPs over "
             "Tk-Instruct's (instruction + input every instance); — means no number.", "", _md_table(header, rows),
             ""]
    for note in notes:
        parts += [note, ""]
    for name, table in extra_tables.items():
        if not table:
            continue
        cols: list[str] = []
        for r in table:
            cols += [k for k in r if k not in cols]
        body = [[(_fmt(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "—"))) for c in cols] for r in table]
        parts += [f"## {name}", "", _md_table(cols, body), ""]
    for caption, fname in plots:
        parts += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    return "\n".join(parts)


def write_report(run_dir: str | Path, results: Mapping[str, Mapping[str, Any]],
                 curves: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
                 extra_tables: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
                 echo: Optional[Mapping[str, Any]] = None, timings: Optional[Mapping[str, float]] = None,
                 title: str = "TAGI evaluation report", notes: Sequence[str] = (),
                 split_labels: Optional[Mapping[str, str]] = None) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots under run_dir; returns {name: path} of what was written.

    results: method → {split: {"rougeL", "exact_match"} | None, "relative_flops": float | None, "time_s": float?}
    curves: curve name → [(step, value), …]; echo: split → metrics of the copy-the-input baseline;
    timings: method → measured seconds per instance (overrides results[m]["time_s"]);
    extra_tables: title → list of row dicts (e.g. P3 accuracy per dataset); notes: paragraphs under the main table
    (e.g. what the seen split measures); split_labels: a split's column name in the markdown (report.json keeps the
    split keys).
    """
    run_dir = Path(run_dir)
    report = normalize_results(results)
    times = {m: float(r["time_s"]) for m, r in results.items() if r.get("time_s") is not None}
    times.update({m: float(t) for m, t in (timings or {}).items()})
    echo_n = {s: _split_entry(v, f"echo[{s!r}]") for s, v in (echo or {}).items() if s in SPLITS}
    written: dict[str, Path] = {}
    plots: list[tuple[str, str]] = []
    if plot_unseen_bar(report, run_dir / EM_PLOT, "exact_match"):
        written["em_plot"] = run_dir / EM_PLOT
        plots.append(("Unseen-task exact match per method", EM_PLOT))
    if plot_unseen_bar(report, run_dir / BAR_PLOT):
        written["bar_plot"] = run_dir / BAR_PLOT
        plots.append(("Unseen-task ROUGE-L per method", BAR_PLOT))
    if plot_curves(curves or {}, run_dir / CURVES_PLOT):
        written["curves_plot"] = run_dir / CURVES_PLOT
        plots.append(("Training curves", CURVES_PLOT))
    atomic_write_json(run_dir / "report.json", report)
    written["json"] = run_dir / "report.json"
    md = render_markdown(report, times, echo_n or None, extra_tables or {}, plots, title, notes, split_labels)
    atomic_write_text(run_dir / "report.md", md)
    written["markdown"] = run_dir / "report.md"
    return written


def read_report(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """report.json back, checked to have exactly the published shape."""
    path = Path(run_dir) / "report.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactMismatchError(f"{path}: cannot read the report ({e})") from None
    want = set(SPLITS) | {"relative_flops"}
    for m, r in data.items():
        if m not in METHODS or not isinstance(r, dict) or set(r) != want:
            raise ArtifactMismatchError(f"{path}: entry {m!r} is not a report entry with keys {sorted(want)}")
    return data
