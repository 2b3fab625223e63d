"""slurm/evaluate.sbatch: syntax, headers, and its dry runs (srun ranks, or an array element): the exact command,
the rendezvous port, and what each shard answers."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tagi_ds.train.launch import port_for

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
SCRIPT = "slurm/evaluate.sbatch"


def _bash(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PYTHON=PY, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=180)


def _command(stdout: str) -> list[str]:
    return shlex.split(next(x for x in stdout.splitlines() if x.startswith("command: "))[len("command: "):])


def _shard_rows(stdout: str) -> list[list[str]]:
    return [x.split("\t") for x in stdout.splitlines() if "\t" in x and not x.startswith("#")]


def test_syntax_and_headers():
    r = subprocess.run(["bash", "-n", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (REPO / SCRIPT).read_text()
    for directive in ("#SBATCH --ntasks-per-node=", "#SBATCH --gpus-per-node=", "#SBATCH --output=logs/",
                      "#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert directive in text


def test_dry_run_ranks(tmp_path):
    r = _bash("configs/tiny.yaml", f"runs_dir={tmp_path}", "eval.batch_size=8", DRY_RUN="1", SLURM_NTASKS="2",
              SLURM_JOB_ID="4242")
    assert r.returncode == 0, r.stderr
    assert "# 2 process(es), rank r answers shard r of 2" in r.stdout
    assert f"env: MASTER_PORT={port_for(4242)}" in r.stdout.splitlines()
    assert _command(r.stdout) == ["srun", "--kill-on-bad-exit=1", PY, "-m", "tagi_ds.cli", "evaluate", "--config",
                                  "configs/tiny.yaml", "--no-progress", f"runs_dir={tmp_path}", "eval.batch_size=8"]
    rows = _shard_rows(r.stdout)
    # nothing trained under this runs_dir: only no_ft has numbers, each split cut in two shards, all to do
    assert {row[0] for row in rows} == {"no_ft"} and {row[2] for row in rows} == {"0/2", "1/2"}
    assert {row[1] for row in rows} == {"seen", "unseen_paraphrase", "unseen_composition"}
    assert all(row[5] == "todo" for row in rows)
    assert "no trained baseline" in r.stdout  # the other methods say why they have no numbers


def test_dry_run_array_element(tmp_path):
    r = _bash("--dry-run", "configs/tiny.yaml", f"runs_dir={tmp_path}", SLURM_ARRAY_TASK_ID="5",
              SLURM_ARRAY_TASK_MIN="2", SLURM_ARRAY_TASK_COUNT="4", SLURM_NTASKS="1", SLURM_JOB_ID="7")
    assert r.returncode == 0, r.stderr
    assert "# array element 3 of 4, 1 process(es) each" in r.stdout
    cmd = _command(r.stdout)
    assert cmd[cmd.index("--no-progress") + 1] == "shard=array"
    assert {row[2] for row in _shard_rows(r.stdout)} == {"0/4", "1/4", "2/4", "3/4"}


@pytest.mark.parametrize("args,msg", [((), "usage: sbatch slurm/evaluate.sbatch CONFIG"),
                                      (("configs/nope.yaml",), "configs/nope.yaml: config file not found")])
def test_dry_run_bad_input(args, msg):
    r = _bash(*args, DRY_RUN="1")
    assert r.returncode != 0 and msg in r.stderr
