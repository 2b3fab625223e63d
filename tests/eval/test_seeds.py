"""bench/seeds_lib.py against hand computations on fixture runs: mean ± sd over seeds, the per-(seed, task) paired
difference, the two-way bootstrap interval, the teachers' seen rows, the markdown and the plot."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def L():
    spec = importlib.util.spec_from_file_location("seeds_lib", REPO / "bench" / "seeds_lib.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seeds_lib"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


# unseen per-task EM of two methods over 3 seeds x 2 tasks (R-L = EM + 10); seen: teacher and tagi on 2 tasks
EM = {"tagi": [[40.0, 20.0], [30.0, 30.0], [50.0, 10.0]], "hint": [[30.0, 20.0], [30.0, 10.0], [20.0, 10.0]]}
SEEN = {"teacher": [[90.0, 50.0], [80.0, 60.0], [70.0, 70.0]], "tagi": [[60.0, 60.0], [60.0, 60.0], [60.0, 80.0]]}


def write_run(root: Path, seed: int) -> Path:
    run = root / f"r_s{seed}"
    methods = {}
    for m, grid in EM.items():
        pt = {f"t{i}": {"exact_match": v, "rougeL": v + 10} for i, v in enumerate(grid[seed])}
        methods[m] = {"unseen": {"overall": {"exact_match": float(np.mean(grid[seed])),
                                             "rougeL": float(np.mean(grid[seed])) + 10}, "per_task": pt}}
    for m, grid in SEEN.items():
        pt = {f"s{i}": {"exact_match": v, "rougeL": v} for i, v in enumerate(grid[seed])}
        methods.setdefault(m, {})["seen"] = {"overall": {"exact_match": float(np.mean(grid[seed])),
                                                         "rougeL": float(np.mean(grid[seed]))}, "per_task": pt}
    methods["teacher"]["unseen"] = None  # the teacher has no unseen number
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"methods": methods, "echo": {
        "unseen": {"exact_match": 2.0, "rougeL": 38.0}}}))
    (run / "pipeline.json").write_text(json.dumps({"seconds": 600.0 + seed}))
    return run


@pytest.fixture()
def runs(L, tmp_path):
    return [L.read_run(write_run(tmp_path, s), s) for s in range(3)]


def test_mean_sd_is_the_sample_sd(L):
    mean, sd = L.mean_sd([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(21 / 9))  # Σ(x − x̄)² = 42/9, n − 1 = 2
    assert L.mean_sd([5.0]) == (5.0, None)


def test_paired_difference_is_per_seed_and_task(L, runs):
    d = L.paired_diff(runs, "tagi", "hint", "unseen", "exact_match")
    assert d.tolist() == [[10.0, 0.0], [0.0, 20.0], [30.0, 0.0]]
    assert L.paired_diff(runs, "tagi", "no_ft", "unseen", "exact_match") is None


def test_bootstrap_resamples_seeds_and_tasks(L):
    d = np.array([[10.0, 0.0], [0.0, 20.0], [30.0, 0.0]])
    mean, lo, hi = L.bootstrap_interval(d, n_boot=300, seed=7)
    # by hand: each draw, 3 seed indices then 2 task indices from the same generator, the grid's mean
    rng = np.random.default_rng(7)
    stats = []
    for _ in range(300):
        rows = [int(x) for x in rng.integers(0, 3, size=3)]
        cols = [int(x) for x in rng.integers(0, 2, size=2)]
        stats.append(sum(d[r][c] for r in rows for c in cols) / 6)
    assert mean == pytest.approx(10.0)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])))
    assert lo < 10.0 < hi
    assert L.bootstrap_interval(np.full((3, 4), 2.5), n_boot=50) == pytest.approx((2.5, 2.5, 2.5))
    with pytest.raises(ValueError, match="seeds, tasks"):
        L.bootstrap_interval(np.zeros(3))


def test_summary_cells_diffs_and_teachers(L, runs):
    s = L.summarize(runs, n_boot=200)
    assert s.methods == ["teacher", "hint", "tagi"] and s.seeds == [0, 1, 2]
    mean, sd = s.cells["tagi"]["unseen"]["exact_match"]
    assert mean == pytest.approx(30.0) and sd == pytest.approx(0.0)  # 30, 30, 30
    mean, sd = s.cells["hint"]["unseen"]["exact_match"]  # 25, 20, 15
    assert mean == pytest.approx(20.0) and sd == pytest.approx(5.0)
    assert "unseen" not in s.cells["teacher"] and s.cells["teacher"]["seen"]["exact_match"][0] == pytest.approx(70.0)
    (diff,) = s.diffs  # only tagi − hint: no tk_instruct, no ablations in these runs
    assert (diff["a"], diff["b"]) == ("tagi", "hint")
    assert diff["exact_match_per_seed"] == pytest.approx([5.0, 10.0, 15.0])
    assert diff["exact_match"][0] == pytest.approx(10.0) and diff["rougeL"][0] == pytest.approx(10.0)
    (t,) = [r for r in s.teachers if r["student"] == "tagi"]
    # teacher − tagi seen EM per seed: 70 − 60, 70 − 60, 70 − 70; teacher ≥ tagi on 1, 2, 1 of 2 tasks
    assert t["em_gap"][0] == pytest.approx(20 / 3) and t["em_gap"][1] == pytest.approx(math.sqrt(100 / 3))
    assert t["teacher_wins"][0] == pytest.approx(4 / 3) and t["tasks"] == 2


def test_markdown_and_plot(L, runs, tmp_path):
    s = L.summarize(runs, n_boot=100)
    md = L.render_markdown(s, "fixture", {"unseen": {"exact_match": 2.0, "rougeL": 38.0}})
    assert "| method | unseen EM | unseen R-L | seen EM | seen R-L |" in md  # EM leads
    assert "| tagi | 30.00 ± 0.00 | 40.00 ± 0.00 |" in md and "| *echo input* | 2.00 | 38.00 |" in md
    assert "| tagi − hint | +10.00 [" in md and "+5.00, +10.00, +15.00" in md
    assert "total 1803 s" in md
    assert L.plot(s, tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert L.to_json(s)["cells"]["hint"]["unseen"]["exact_match"] == {"mean": pytest.approx(20.0),
                                                                      "sd": pytest.approx(5.0)}


def test_a_run_without_evaluation_is_named(L, tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation"):
        L.read_run(tmp_path / "missing", 0)


def test_seed_runs_and_table_folder_are_named_by_the_config(monkeypatch):
    """Seed s runs as <name>_<tag>_s<s>; the table folder is <name>_<tag>_seeds, not named after seed 0's run."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("seeds_bench", REPO / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    args = argparse.Namespace(name=None, config=str(REPO / "configs" / "tiny.yaml"), overrides=["cache.mode=sampled"],
                              tag="sampled", runs_dir=None, dev=0, ablations=False, backbone_per_seed=False)
    cfg = seeds.seed_config(args, 1)
    assert (cfg.name, cfg.seed, cfg.cache.mode) == ("tiny_sampled_s1", 1, "sampled")
    assert seeds.out_dir(args, cfg) == Path(cfg.runs_dir) / "tiny_sampled_seeds"


def test_reuse_copies_only_the_stages_the_source_ran_for_this_identity(monkeypatch, tmp_path):
    """--reuse: teachers and baselines of a run that differs only in hypernet.encoder are copied; its pretrain is
    not (the encoder reaches the pretrain's identity), so this run trains its own instead of refusing the copy."""
    from tagi_ds import pipeline
    from tagi_ds.config import load_config
    from tagi_ds.io_utils import sha256_json
    from tagi_ds.run.paths import RunPaths

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("seeds_bench", REPO / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    yaml = REPO / "configs" / "tiny.yaml"
    src_cfg = load_config(yaml, [f"runs_dir={tmp_path}", "name=src_s0"])
    dst_cfg = load_config(yaml, [f"runs_dir={tmp_path}", "name=dst_s0", "hypernet.encoder=multitask"])
    markers = pipeline.Markers(RunPaths.of(src_cfg))
    for stage, folders in seeds.REUSED.items():
        st = pipeline.stage(stage)
        for sub in st.subs(src_cfg):
            markers.mark(stage, sub, sha256_json(pipeline.identity(src_cfg, st, sub)), 1.0)
        for folder in folders:
            (src_cfg.run_dir / folder).mkdir(parents=True)
            (src_cfg.run_dir / folder / "weights").write_text(stage)
    said = []
    seeds.reuse(dst_cfg, src_cfg.run_dir, said.append)
    assert (dst_cfg.run_dir / "teachers" / "weights").read_text() == "teacher"
    assert (dst_cfg.run_dir / "baselines" / "weights").read_text() == "baselines"
    assert not (dst_cfg.run_dir / "pretrain").exists()
    assert not (dst_cfg.run_dir / ".pipeline" / "pretrain.json").exists()
    assert any("pretrain not reused" in m for m in said)
