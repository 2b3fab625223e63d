"""The CLI lists every stage and prints user errors without a traceback (exit 2)."""
from __future__ import annotations

import subprocess
import sys

from tagi_ds import cli

STAGES = ["tasks", "backbone", "teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate", "pipeline",
          "generate-adapter", "predict", "plan"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tagi_ds.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


def test_config_error_is_one_paragraph_exit_2(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  stepz: 1\n")
    # any built config stage would do; use a stand-in module that would fail loudly if it were reached
    monkeypatch.setitem(cli.COMMANDS, "teacher", cli.Command("tagi_ds.config", "x", True))
    assert cli.main(["teacher", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'finetune.stepz'" in err and str(bad) in err and "Traceback" not in err


def test_one_process_tools_refuse_a_multi_rank_launch(monkeypatch, capsys):
    """Issue 16: under torchrun / srun every rank would run a one-process tool and race on its output. The tools say
    so and exit 2; the same command without a launcher runs."""
    args = ["plan", "--config", "configs/t5-xl-sni.yaml", "--nodes", "1", "--gpus-per-node", "8"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (args, ["tasks", "--synthetic"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"tagi-ds {command[0]}: error: runs in one process" in err and "started 2 ranks" in err, err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun --ntasks=4
    assert cli.main(args) == 2 and "started 4 ranks" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert cli.main(args) == 0
