"""Teacher + cache-logits as array stages: two indices one after the other, reruns that do no work, refusals of
mismatched artifacts, `--list`, the Slurm dry run with stage overrides, and `inspect-cache` on the result."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.teacher_helpers import run_cfg
from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.train import cache_logits, teacher
from tagi_ds.run.artifacts import teacher_manifest
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.units import load_run_units

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def _files_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def array_run(tiny_backbone_dir, tmp_path_factory):
    """Array elements 0 and 1 of a 2-unit run, teacher then cache, one after the other (as Slurm would)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = run_cfg(runs, tiny_backbone_dir("llama"), "llama", "data.max_tasks=2", "teacher.steps=8")
    logs: list[str] = []
    for idx in ("0", "1"):
        assert teacher.run(cfg, array_index=idx, progress=False, log=logs.append)["trained"] == \
            [["synth_first", "synth_second"][int(idx)]]
    for idx in ("0", "1"):
        assert len(cache_logits.run(cfg, array_index=idx, log=logs.append)["written"]) == 1
    return cfg, logs


def test_two_array_indices_make_two_teachers_and_two_shards(array_run):
    cfg, _ = array_run
    assert sorted(p.name for p in (cfg.run_dir / "teachers").iterdir()) == ["synth_first", "synth_second"]
    assert sorted(p.name for p in (cfg.run_dir / "logit_cache").iterdir()) == ["synth_first", "synth_second"]


def test_rerun_does_no_work(array_run):
    cfg, _ = array_run
    before = _files_mtimes(cfg.run_dir / "teachers") | _files_mtimes(cfg.run_dir / "logit_cache")
    logs: list[str] = []
    for idx in ("0", "1"):
        assert teacher.run(cfg, array_index=idx, progress=False, log=logs.append)["trained"] == []
        assert cache_logits.run(cfg, array_index=idx, log=logs.append)["written"] == []
    assert teacher.run(cfg, progress=False, log=logs.append) == {"trained": [],
                                                                 "skipped": ["synth_first", "synth_second"]}
    after = _files_mtimes(cfg.run_dir / "teachers") | _files_mtimes(cfg.run_dir / "logit_cache")
    assert after == before  # not one file rewritten
    assert sum("skipped" in ln for ln in logs) == 6


def test_teacher_of_another_configuration_is_refused(array_run, tiny_backbone_dir):
    cfg, _ = array_run
    other = run_cfg(Path(cfg.runs_dir), tiny_backbone_dir("llama"), "llama", "data.max_tasks=2", "teacher.steps=8",
                    "teacher.lr=0.02")
    bb = load_run_backbone(other)
    want = teacher_manifest(other, "synth_first", load_run_units(other).tasks["synth_first"], bb.arch,
                            bb.tokenizer_hash)["hash"]
    with pytest.raises(ArtifactMismatchError) as e:
        teacher.run(other, task="synth_first", progress=False)
    msg = str(e.value)
    assert str(cfg.run_dir / "teachers" / "synth_first") in msg and want in msg
    have = (cfg.run_dir / "teachers" / "synth_first" / "manifest.json").read_text()
    assert re.search(r'"hash": "([0-9a-f]{64})"', have).group(1) in msg
    with pytest.raises(ArtifactMismatchError, match="another configuration"):  # cache refuses that teacher too
        cache_logits.run(other, task="synth_first")


def test_cache_of_another_configuration_is_refused_and_temperatures_must_agree(array_run, tiny_backbone_dir):
    cfg, _ = array_run
    args = (Path(cfg.runs_dir), tiny_backbone_dir("llama"), "llama", "data.max_tasks=2", "teacher.steps=8")
    with pytest.raises(ArtifactMismatchError, match=r"manifest field 'k' is 8 but this run expects 4"):
        cache_logits.run(run_cfg(*args, "cache.top_k=4"), array_index="0")
    with pytest.raises(ConfigError, match=r"cache.temperature=1.0 must equal finetune.temperature=2.0"):
        cache_logits.run(run_cfg(*args, "cache.temperature=1.0"), array_index="0")


def test_selection_errors_name_the_range_and_the_missing_teacher(array_run, tiny_backbone_dir, tmp_path):
    cfg, _ = array_run
    with pytest.raises(ConfigError, match=r"array_index=2 is out of range: valid indices are 0-1"):
        teacher.run(cfg, array_index="2", progress=False)
    with pytest.raises(ConfigError, match=r"task='nope' is not a training task"):
        teacher.run(cfg, task="nope", progress=False)
    fresh = run_cfg(tmp_path, tiny_backbone_dir("llama"), "llama", "data.max_tasks=2")
    with pytest.raises(ArtifactMismatchError, match="no teacher for unit 'synth_first' yet"):
        cache_logits.run(fresh, array_index="0")
    assert cache_logits.run(fresh)["no_teacher"] == ["synth_first", "synth_second"]  # all units: skipped


def test_inspect_cache_reports_bytes_per_token_and_kept_mass(array_run, capsys):
    from tagi_ds.cli import main

    cfg, _ = array_run
    assert main(["inspect-cache", str(cfg.run_dir / "logit_cache")]) == 0
    out = capsys.readouterr().out
    total = next(ln for ln in out.splitlines() if ln.startswith("TOTAL"))
    bytes_per_tok, mass = map(float, total.split()[-2:])
    with capsys.disabled():
        print(f"\ninspect-cache (k=8, T=2, tiny LLaMA): {total}")
    assert bytes_per_tok == 8 * (2 + 2)  # k x (float16 log-prob + uint16 id)
    assert 0.0 < mass <= 1.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=PY, OMP_NUM_THREADS="1")
    return env


def test_list_prints_units_and_the_sbatch_line():
    from tagi_ds.config import load_config
    from tagi_ds.run.units import load_run_units

    units = load_run_units(load_config(REPO / "configs" / "tiny.yaml")).units
    r = subprocess.run([PY, "-m", "tagi_ds.cli", "teacher", "--config", "configs/tiny.yaml", "--list"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # "index<TAB>unit", followed by the unit's task count when teachers are grouped by category
    assert len(lines) > len(units)
    for i, u in enumerate(units):
        assert lines[i] == f"{i}\t{u}" or lines[i].startswith(f"{i}\t{u}\t("), lines[i]
    n = len(units)
    assert f"mkdir -p logs && sbatch --array=0-{n - 1}%16 slurm/teachers_array.sbatch configs/tiny.yaml" in lines
    assert f"mkdir -p logs && sbatch --array=0-{n - 1}%16 slurm/cache_array.sbatch configs/tiny.yaml" in lines


def test_slurm_dry_run_accepts_stage_overrides():
    r = subprocess.run(["bash", "slurm/teachers_array.sbatch", "configs/tiny.yaml", "teacher.resume=auto",
                        "teacher.steps=5"], cwd=REPO, env={**_env(), "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmd = next(ln for ln in r.stdout.splitlines() if ln.startswith("command: "))
    assert cmd.endswith("teacher --config configs/tiny.yaml array_index=1 teacher.resume=auto teacher.steps=5")


def test_category_units_train_one_teacher_and_write_one_shard_per_task(tiny_backbone_dir, tmp_path):
    cfg = run_cfg(tmp_path, tiny_backbone_dir("llama"), "llama", "teacher.group_by=category", "teacher.steps=3")
    assert teacher.list_units(cfg, "c.yaml").splitlines()[0] == "0\tsynthetic primitive\t(3 tasks)"
    assert teacher.run(cfg, task="synth_second", progress=False)["trained"] == ["synthetic primitive"]
    man = (cfg.run_dir / "teachers" / "synthetic primitive" / "manifest.json").read_text()
    assert '"synth_first"' in man and '"synth_third"' in man
    # the finetune looks shards up by task name: one shard per task, all from the category's teacher
    assert cache_logits.run(cfg, array_index="0")["written"] == ["synth_first", "synth_second", "synth_third"]


def test_time_budget_stops_training_and_publishes_what_it_has(tiny_backbone_dir, tmp_path):
    import json

    cfg = run_cfg(tmp_path, tiny_backbone_dir("llama"), "llama", "data.max_tasks=1", "teacher.time_budget_s=0")
    logs: list[str] = []
    teacher.run(cfg, progress=False, log=logs.append)
    m = json.loads((cfg.run_dir / "teachers" / "synth_first" / "metrics.json").read_text())
    assert m["steps_done"] == 0 and m["stopped_by_budget"] is True
    assert any("time budget 0.0s reached at step 0/30" in ln for ln in logs)
