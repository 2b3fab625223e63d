"""Fixtures of the modeling tests."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["t5", "llama"])
def arch(request) -> str:
    return request.param
