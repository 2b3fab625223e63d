"""tests/tools runs the hand-run utilities under tools/ as a user does: `python tools/X.py ...` from the repository
root, in a subprocess. The fixture writers they share with the data tests live in tests/data/p3_fixture.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS...` from the repository root, this checkout first on the path, offline."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def run():
    return run_py
