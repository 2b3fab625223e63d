"""Helpers of the reliability tests (a module, so tests can import it by name)."""
from __future__ import annotations

from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `root`, hidden temp files included: "nothing written" means equal."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}
