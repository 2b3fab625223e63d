"""Fixtures of the adapters tests: per arch, a tiny backbone folder (tokenizer + model) and a hypernetwork export,
built once per session."""
from __future__ import annotations

import pytest

from tests.adapters.adapters_helpers import build_backbone_dir, build_export


@pytest.fixture(scope="session", params=["t5", "llama"])
def exported(request, tmp_path_factory):
    """(arch, backbone dir, export dir) with fusion on."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"export_{arch}")
    backbone = build_backbone_dir(root / "backbone", arch)
    return arch, backbone, build_export(root / "export", backbone, arch, fusion=True)
