"""Fixtures of the train tests: tiny tokenizers + backbones built once per session (teacher / cache-logits)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """`tiny_backbone_dir(arch)` → a folder with a tiny seeded T5 or LLaMA and its sentencepiece tokenizer."""
    from teacher_helpers import build_tiny_backbone_dir

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_backbone_dir(tmp_path_factory.mktemp(f"tiny_{arch}") / "backbone", arch)
        return built[arch]

    return get
