"""Issue 19 case 8 (and 11, "two finetunes at once"): one writer per stage folder.

Two `tagi-ds finetune variant=dup` on one run folder: the first runs; the second exits 2 within a second, naming
the holder's host and pid, and writes nothing; the winner's metrics, checkpoints and export equal a solo run's.
The lock mechanics (io_utils.file_lock) underneath: a lock whose holder was SIGKILLed is taken over, whole-stage and
per-unit locks exclude each other while units run side by side, and a released lock leaves no file.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.proc_helpers import worker_env
from tests.reliability.rel_helpers import cli_run, copy_run, tree_sha
from tagi_ds.io_utils import LockHeldError, file_lock, lock_holders

REPO = Path(__file__).resolve().parents[2]
STEPS = ["finetune.steps=12", "finetune.checkpoint_every=4", "finetune.keep_checkpoints=5"]


def _cli_proc(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tagi_ds.cli", *args], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def test_two_finetunes_of_one_variant_one_runs_the_other_exits_at_once(rel_run, capsys, tmp_path):
    runs = tmp_path / "runs"
    run = copy_run(rel_run.run_dir, runs)
    args = ["finetune", *rel_run.args(f"runs_dir={runs}", "variant=dup", *STEPS)]
    winner = _cli_proc(args)
    lock = run / ".locks" / "finetune__dup.lock"
    try:
        deadline = time.time() + 180
        while _holder(lock).get("pid") != winner.pid:  # the winner holds the lock from the start of its run
            assert winner.poll() is None, winner.communicate()[1][-3000:]
            assert time.time() < deadline, "the first finetune never took its lock"
            time.sleep(0.02)
        t0 = time.perf_counter()
        rc, _, err = cli_run(capsys, args)  # the second writer, while the first trains
        seconds = time.perf_counter() - t0
        assert winner.poll() is None, "the first finetune finished before the second tried: no overlap tested"
    finally:
        out, werr = winner.communicate(timeout=300)
    msg = [ln for ln in err.splitlines() if ln.startswith("tagi-ds finetune: error:")]
    assert rc == 2 and len(msg) == 1 and "Traceback" not in err, err
    assert seconds < 1.0, f"the second finetune took {seconds:.2f} s to give up"
    for want in (f"pid {winner.pid} on host {socket.gethostname()}", "finetune (dup): already being written by",
                 str(lock)):
        assert want in msg[0], msg[0]
    with capsys.disabled():
        print(f"\n[finetune] rc=2 after {seconds:.2f} s :: {msg[0]}")
    assert winner.returncode == 0, werr[-3000:]
    assert not lock.exists()  # released, removed

    solo = _cli_proc(["finetune", *rel_run.args(f"runs_dir={runs}", "variant=solo", *STEPS)])
    _, serr = solo.communicate(timeout=300)
    assert solo.returncode == 0, serr[-3000:]
    a, b = run / "finetune" / "dup", run / "finetune" / "solo"
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert len((a / "metrics.jsonl").read_text().splitlines()) == 12  # one writer: no interleaved lines
    export = "export/trainable.safetensors"
    assert (a / export).read_bytes() == (b / export).read_bytes()
    tags = sorted(p.name for p in (a / "checkpoints").iterdir() if p.is_dir())
    assert tags == sorted(p.name for p in (b / "checkpoints").iterdir() if p.is_dir()) and len(tags) == 3
    for tag in tags:
        for name in ("trainable.pt", "optimizer.pt"):
            x = torch.load(a / "checkpoints" / tag / name, weights_only=True)
            y = torch.load(b / "checkpoints" / tag / name, weights_only=True)
            assert json.dumps(_flat(x), sort_keys=True) == json.dumps(_flat(y), sort_keys=True), (tag, name)


def _flat(obj):
    """A JSON-able image of a checkpoint (tensors as lists) for an exact comparison."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _flat(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flat(v) for v in obj]
    return obj


HOLD = """
import sys, time
from pathlib import Path
from tagi_ds.io_utils import file_lock
with file_lock(exclusive=[Path(sys.argv[1])], stage="teacher"):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    lock, ready = tmp_path / ".locks" / "teacher.lock", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(ready)], cwd=REPO, env=worker_env())
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(LockHeldError, match=f"already being written by pid {holder.pid} on host"):
            with file_lock(exclusive=[lock], stage="teacher"):
                pass
        assert lock_holders([lock]) and str(holder.pid) in lock_holders([lock])[0]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert lock.exists() and json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the dead holder
    said = []
    with file_lock(exclusive=[lock], stage="teacher", log=said.append):
        assert json.loads(lock.read_text())["pid"] != holder.pid
    assert said and f"left by pid {holder.pid}" in said[0] and "no longer running" in said[0]
    assert not lock.exists() and not lock.parent.exists()


def test_units_run_side_by_side_but_not_beside_the_whole_stage(rel_run, tmp_path):
    from tagi_ds.run.stage_lock import stage_lock

    cfg = rel_run.cfg(f"runs_dir={tmp_path / 'runs'}", "name=l")
    with stage_lock(cfg, "teacher", "index-0"):
        with stage_lock(cfg, "teacher", "index-1"):  # another array task: fine
            pass
        with pytest.raises(LockHeldError, match=r"teacher \(index-0\): already being written"):
            with stage_lock(cfg, "teacher", "index-0"):
                pass
        with pytest.raises(LockHeldError, match="teacher: already being written"):
            with stage_lock(cfg, "teacher"):  # the whole stage while a unit runs
                pass
    with stage_lock(cfg, "teacher"):
        with pytest.raises(LockHeldError):
            with stage_lock(cfg, "teacher", "index-1"):
                pass
    assert tree_sha(tmp_path) == {}  # nothing left: no lock files, no run folder


def test_other_ranks_take_no_lock(rel_run, tmp_path, monkeypatch):
    from tagi_ds.run.stage_lock import stage_lock

    cfg = rel_run.cfg(f"runs_dir={tmp_path / 'runs'}", "name=l")
    with stage_lock(cfg, "finetune", "tagi"):
        monkeypatch.setenv("RANK", "1")  # the same job's rank 1: one writer with rank 0
        with stage_lock(cfg, "finetune", "tagi"):
            pass
