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
