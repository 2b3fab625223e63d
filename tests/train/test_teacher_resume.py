"""A real `tagi-ds teacher` subprocess SIGKILLed mid-training resumes from its checkpoint on rerun and publishes the
same adapter as an uninterrupted run; nothing is published under the final name before that."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train.teacher_helpers import cli_overrides, run_cfg
from tagi_ds.train import teacher

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
EXTRA = ("data.max_tasks=1", "teacher.steps=150", "teacher.checkpoint_every=10", "threads=1")


def test_sigkilled_teacher_resumes_to_the_same_adapter(tiny_backbone_dir, tmp_path):
    bdir = tiny_backbone_dir("llama")
    (tmp_path / "c.yaml").write_text("{}\n")
    cmd = [PY, "-m", "tagi_ds.cli", "teacher", "--config", str(tmp_path / "c.yaml"), "array_index=0",
           *cli_overrides(bdir, "llama", tmp_path, *EXTRA, name="killed")]
    cfg = run_cfg(tmp_path, bdir, "llama", *EXTRA, name="killed")
    ckpt = cfg.run_dir / "teachers" / ".ckpt" / "synth_first" / "state.pt"
    final = cfg.run_dir / "teachers" / "synth_first"

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 180:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert ckpt.exists(), f"no checkpoint was written: {proc.stdout.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists()  # killed before publishing: nothing under the final name
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 10 <= killed_at < 150

    prev = torch.get_num_threads()
    logs: list[str] = []
    try:
        out = teacher.run(cfg, array_index="0", progress=False, log=logs.append)  # the rerun resumes
        ref_cfg = run_cfg(tmp_path, bdir, "llama", *EXTRA, name="uninterrupted")
        teacher.run(ref_cfg, array_index="0", progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(prev)
    assert out["trained"] == ["synth_first"]
    resumed = [ln for ln in logs if "resumed synth_first" in ln]
    assert resumed and resumed[0].endswith(f"at step {ckpt_step(resumed[0])}") and ckpt_step(resumed[0]) >= 10
    got = load_file(final / "adapter_model.safetensors")
    want = load_file(ref_cfg.run_dir / "teachers" / "synth_first" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in got)
    print(f"\nkilled at step >= {killed_at}, resumed at {ckpt_step(resumed[0])}; max |Δ| vs uninterrupted = {diff:.2e}")
    assert diff <= 1e-6
    assert not ckpt.parent.exists()  # removed once published


def ckpt_step(line: str) -> int:
    return int(line.rsplit(" ", 1)[1])
