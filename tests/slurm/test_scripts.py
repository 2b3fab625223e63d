"""The Slurm scripts: syntax, dry runs (exact command, port, unit), range errors, pre-emption handling."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagi_ds.train.launch import port_for, render_node_commands

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["slurm/common.sh", "slurm/teachers_array.sbatch", "slurm/cache_array.sbatch", "slurm/train_multinode.sbatch"]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=PY, OMP_NUM_THREADS="1", **kw)
    return env


def _bash(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["slurm/teachers_array.sbatch", "slurm/cache_array.sbatch"])
def test_array_script_headers(script):
    text = (REPO / script).read_text()
    for directive in ("#SBATCH --array=", "#SBATCH --output=logs/%x-%A_%a.out", "#SBATCH --requeue",
                      "#SBATCH --signal=B:USR1@"):
        assert directive in text
    assert "--array given on the sbatch command line overrides" in text


@pytest.mark.parametrize("script,stage", [("slurm/teachers_array.sbatch", "teacher"),
                                          ("slurm/cache_array.sbatch", "cache-logits")])
def test_array_dry_run_prints_unit_command_and_port(script, stage):
    from tagi_ds.config import load_config
    from tagi_ds.run.units import load_run_units

    # one unit per task (the tiny config groups by category: 2 units), so index 3 exists
    units = load_run_units(load_config(REPO / "configs" / "tiny.yaml", ["teacher.group_by=task"])).units
    r = _bash(script, "configs/tiny.yaml", "teacher.group_by=task", "teacher.steps=5", DRY_RUN="1",
              SLURM_ARRAY_TASK_ID="3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"unit: {units[3]} (array index 3)" in lines
    env = dict(line[len("env: "):].split("=", 1) for line in lines if line.startswith("env: "))
    assert env["MASTER_PORT"] == str(port_for(3)) == "29503"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    cmd = next(line for line in lines if line.startswith("command: "))[len("command: "):]
    assert shlex.split(cmd) == [PY, "-m", "tagi_ds.cli", stage, "--config", "configs/tiny.yaml", "array_index=3",
                                "teacher.group_by=task", "teacher.steps=5"]


def test_array_ports_differ_per_index():
    ports = set()
    for idx in ("0", "17"):
        r = _bash("slurm/teachers_array.sbatch", "configs/tiny.yaml", "teacher.group_by=task", DRY_RUN="1",
                  SLURM_ARRAY_TASK_ID=idx)
        assert r.returncode == 0, r.stderr
        ports.add(next(line for line in r.stdout.splitlines() if line.startswith("env: MASTER_PORT=")))
    assert ports == {"env: MASTER_PORT=29500", "env: MASTER_PORT=29517"}


def test_array_index_out_of_range_fails_naming_range():
    r = _bash("slurm/teachers_array.sbatch", "configs/tiny.yaml", DRY_RUN="1", SLURM_ARRAY_TASK_ID="9999")
    assert r.returncode == 2
    assert "array_index=9999 is out of range: valid indices are 0-" in r.stderr
    assert "command:" not in r.stdout


def test_array_script_needs_an_index():
    r = _bash("slurm/cache_array.sbatch", "configs/tiny.yaml", DRY_RUN="1")
    assert r.returncode != 0 and "SLURM_ARRAY_TASK_ID" in r.stderr


def test_render_node_commands_two_nodes():
    cmds = render_node_commands(["gpu-a", "gpu-b"], 8, 123456, "configs/t5-xl-sni.yaml", "ds_configs/zero3.json",
                                "finetune")
    assert len(cmds) == 2
    port = 29500 + 123456 % 3000
    for rank, cmd in enumerate(cmds):
        argv = shlex.split(cmd)
        assert argv[0] == "torchrun"
        assert "--nnodes=2" in argv and "--nproc_per_node=8" in argv and "--rdzv_backend=c10d" in argv
        assert f"--rdzv_endpoint=gpu-a:{port}" in argv  # every node meets on the first host
        assert "--rdzv_id=123456" in argv
        assert f"--rdzv_conf=is_host={1 if rank == 0 else 0}" in argv  # only node 0 hosts the store
        tail = argv[argv.index("-m"):]
        assert tail == ["-m", "tagi_ds.cli", "finetune", "--config", "configs/t5-xl-sni.yaml",
                        "distributed.ds_config=ds_configs/zero3.json", "finetune.resume=auto"]


def test_render_rejects_bad_input():
    from tagi_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="compressed"):
        render_node_commands("gpu-[1-2]", 8, 1, "c.yaml", "d.json", "finetune")
    with pytest.raises(ConfigError, match="duplicates"):
        render_node_commands("n1 n1", 8, 1, "c.yaml", "d.json", "finetune")
    with pytest.raises(ConfigError, match="stage"):
        render_node_commands("n1", 8, 1, "c.yaml", "d.json", "backbone")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_multinode_dry_run_matches_render(how):
    args = ["configs/t5-xl-sni.yaml", "ds_configs/zero3.json", "pretrain", "pretrain.steps=7"]
    env = {"NODELIST": "node-1 node-2", "GPUS_PER_NODE": "4", "SLURM_JOB_ID": "777"}
    if how == "env":
        r = _bash("slurm/train_multinode.sbatch", *args, DRY_RUN="1", **env)
    else:
        r = _bash("slurm/train_multinode.sbatch", "--dry-run", *args, **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"# rendezvous: c10d on node-1:{29500 + 777} (2 nodes x 4 GPUs = 8 ranks)" in lines
    assert "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines
    printed = [line for line in lines if not line.startswith(("#", "env: "))]
    launcher = tuple(shlex.split(printed[0])[:3])
    assert launcher[1:] == ("-m", "torch.distributed.run")
    expected = render_node_commands(["node-1", "node-2"], 4, 777, "configs/t5-xl-sni.yaml", "ds_configs/zero3.json",
                                    "pretrain", overrides=["pretrain.steps=7"], launcher=launcher)
    assert printed == expected


def test_multinode_dry_run_missing_config_fails():
    r = _bash("slurm/train_multinode.sbatch", "configs/nope.yaml", "ds_configs/zero3.json", DRY_RUN="1",
              NODELIST="n1 n2")
    assert r.returncode == 2 and "configs/nope.yaml: file not found" in r.stderr


def test_node_rank_from_slurm(monkeypatch):
    from tagi_ds.errors import ConfigError
    from tagi_ds.train.launch import _node_rank

    monkeypatch.setenv("SLURM_NODEID", "1")
    assert _node_rank("slurm", 2) == 1
    assert _node_rank("0", 2) == 0
    with pytest.raises(ConfigError, match="out of range"):
        _node_rank("slurm", 1)


def test_usr1_stops_the_run_and_requeues(tmp_path):
    """The batch shell's USR1 (Slurm's time-limit warning) reaches the run as SIGTERM and the shell exits 0."""
    child = tmp_path / "child.sh"
    child.write_text("trap 'echo child-got-term; kill $!; exit 143' TERM\nsleep 30 & wait\n")
    body = f'source slurm/common.sh; tagi_run_requeueable bash {child}; echo "returned=$?"'
    p = subprocess.Popen(["bash", "-c", body], cwd=REPO, env=_env(DRY_RUN="1", PATH="/usr/bin:/bin"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    t0 = time.time()
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=20)
    assert time.time() - t0 < 10  # not the 30 s sleep
    assert "child-got-term" in out and "returned=0" in out
    assert "USR1: time limit or pre-emption near" in err
