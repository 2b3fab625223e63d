"""Fixtures of the train tests: tiny tokenizers + backbones built once per session (teacher / cache-logits)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import backbone_dir


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """`tiny_backbone_dir(arch)` → a folder with a tiny seeded T5 or LLaMA (hidden 64, vocab 600) and its
    sentencepiece tokenizer: small enough for 2 shared cores, big enough that a LoRA teacher visibly learns."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = backbone_dir(tmp_path_factory.mktemp(f"tiny_{arch}") / "backbone", arch)
        return built[arch]

    return get
