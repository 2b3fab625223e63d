"""Session-wide test settings. Package-specific fixtures live in tests/<package>/conftest.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton decides interpreter mode when its own library functions (tl.cdiv, …) are decorated, i.e. at its first import.
# Without CUDA the kernel tests run under the interpreter, so the switch must be on before ANY test imports triton;
# setting it later (in the kernel test module) fails as soon as another test imported triton first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_SNI = REPO.parent / "shared" / "data" / "sni"


@pytest.fixture(scope="session")
def sni_dir() -> Path:
    """The real SNI subset beside the repo; tests that need it skip cleanly when it is absent."""
    if not (SHARED_SNI / "tasks").is_dir():
        pytest.skip(f"SNI data not found at {SHARED_SNI}")
    return SHARED_SNI


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("TAGI_TEST_THREADS", "2")))
    yield
