"""Teacher and cache-logits under torchrun: each of 2 gloo ranks trains / writes its own half of the units (nothing
written twice) and the artifacts equal a 1-process run's byte for byte; array elements of several units; a teacher
batch stopped by SIGTERM checkpoints and the rerun resumes it."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagi_ds.run.array import n_jobs, resolve_array_index
from tagi_ds.train import teacher
from tests.proc_helpers import free_port, worker_env
from tests.train.teacher_helpers import cli_overrides, run_cfg

REPO = Path(__file__).resolve().parents[2]
# 4 units, each alone in its batch (tasks_per_batch=1): a unit's numbers cannot depend on its batch-mates or rank
EXTRA = ("data.max_tasks=4", "teacher.group_by=task", "teacher.steps=4", "teacher.tasks_per_batch=1", "teacher.checkpoint_every=0",
         "data.synthetic.instances_per_task=16", "data.synthetic.held_back_per_task=2", "eval.max_new_tokens=2")


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every weights / cache data file under root (metrics.json holds timings: excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.name == "adapter_model.safetensors" or p.parent.parent.name == "logit_cache")
            and not p.name.startswith(".")}


def _cli(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port())] if ranks > 1 else [sys.executable]
    return subprocess.run(head + ["-m", "tagi_ds.cli", *args], env=worker_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def test_two_ranks_split_teachers_and_cache_and_match_one_process(tiny_backbone_dir, tmp_path):
    bb = tiny_backbone_dir("llama")
    runs = {}
    for ranks in (2, 1):
        sets = cli_overrides(bb, "llama", tmp_path / f"runs{ranks}", *EXTRA)
        for stage in ("teacher", "cache-logits"):
            r = _cli([stage, "--config", str(REPO / "configs" / "tiny.yaml"), *sets], ranks)
            assert r.returncode == 0, r.stderr[-4000:]
            if ranks == 2 and stage == "teacher":
                assert r.stdout.count("trains 2 unit(s)") == 2, r.stdout[-3000:]  # each rank half
                assert r.stdout.count("teacher synth_") == 4  # four units, each published once
        runs[ranks] = tmp_path / f"runs{ranks}" / "t"
    two, one = _digests(runs[2]), _digests(runs[1])
    assert len([k for k in one if k.endswith("adapter_model.safetensors")]) == 4 and len(one) > 4
    assert two == one


def test_array_elements_hold_several_units(tiny_backbone_dir, tmp_path):
    units = [f"u{i}" for i in range(10)]
    assert n_jobs(10, 4) == 3 and resolve_array_index(units, 2, 4) == ["u8", "u9"]
    with pytest.raises(Exception, match=r"valid indices are 0-2 \(10 units, 4 per job\)"):
        resolve_array_index(units, 3, 4)
    cfg = run_cfg(tmp_path, tiny_backbone_dir("llama"), "llama", "data.max_tasks=3", "teacher.units_per_job=2",
                  "teacher.write_cache=true")
    listing = teacher.list_units(cfg, "c.yaml").splitlines()
    assert listing[0] == "0\tsynth_first synth_second" and listing[1] == "1\tsynth_third"
    assert any("--array=0-1%16" in ln for ln in listing) and not any("cache_array" in ln for ln in listing)


def test_sigterm_stops_a_teacher_batch_with_a_checkpoint_and_the_rerun_finishes_it(tiny_backbone_dir, tmp_path):
    sets = cli_overrides(tiny_backbone_dir("llama"), "llama", tmp_path / "runs", "data.max_tasks=1", "teacher.group_by=task",
                         "teacher.steps=400", "teacher.checkpoint_every=0")
    cmd = [sys.executable, "-m", "tagi_ds.cli", "teacher", "--config", str(REPO / "configs" / "tiny.yaml"), *sets]
    proc = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    tb = tmp_path / "runs" / "t" / "tb" / "teacher"
    deadline = time.time() + 240
    while not (tb.is_dir() and any(tb.iterdir())):  # the TensorBoard writer exists once training started
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 75, err[-3000:]
    assert "stopped at step" in err and "checkpoint" in err, err[-2000:]
    ckpt = tmp_path / "runs" / "t" / "teachers" / ".ckpt" / "synth_first" / "state.pt"
    assert ckpt.is_file() and not (tmp_path / "runs" / "t" / "teachers" / "synth_first").exists()
    rerun = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed synth_first" in rerun.stdout and "400 steps" in rerun.stdout
