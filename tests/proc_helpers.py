"""Launching and killing real worker processes in tests (torchrun launches, SIGKILL mid-run)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(warnings: str = "ignore::FutureWarning", **extra: str) -> dict:
    """The environment of a launched worker: CPU DeepSpeed, offline hubs, one thread, no inherited rank variables
    (a test run under a launcher must not leak its own RANK/MASTER_* into the workers it starts)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS=warnings,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def start_launcher(cmd: Sequence[str]) -> subprocess.Popen:
    """A launcher in its own process group, so SIGKILL can take it down the way a node loss would."""
    return subprocess.Popen(list(cmd), env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def sigkill_when_ready(launcher: subprocess.Popen, pid_files: Sequence[Path], timeout: float = 400) -> int:
    """Wait until every worker wrote its pid file (it does so right after the checkpoint it stalls on), then
    SIGKILL the launcher's group and each worker's own group (torchrun starts workers in their own sessions).
    Returns the launcher's return code."""
    deadline = time.time() + timeout
    while not all(p.exists() for p in pid_files):
        assert launcher.poll() is None, f"launcher exited early: {launcher.stderr.read()[-4000:]}"
        assert time.time() < deadline, "the run never reached its checkpoint"
        time.sleep(0.5)
    os.killpg(launcher.pid, signal.SIGKILL)
    for p in pid_files:
        os.killpg(int(p.read_text()), signal.SIGKILL)
    launcher.wait(timeout=30)
    return launcher.returncode


_PEAK_RSS = ("import atexit, resource, sys\n"
             "atexit.register(lambda: print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', "
             "file=sys.stderr))\n"
             "from tagi_ds.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")


def cli_peak_rss(args: Sequence[str], timeout: float = 600, **env: str) -> tuple[int, int, str]:
    """Run `tagi-ds ARGS` in a fresh process; (return code, its own peak RSS in KiB, stderr)."""
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS, *args], env=worker_env(**env), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    peak = [int(line.split("=", 1)[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
    return r.returncode, (peak[-1] if peak else -1), r.stderr
