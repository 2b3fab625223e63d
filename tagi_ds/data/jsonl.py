"""Reading UTF-8 JSON-lines files: one object per non-blank line, errors naming file:line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError


def read_utf8(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_jsonl_objects(path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `expected` describes the object in the error message."""
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected {expected}, got {type(obj).__name__}")
        yield lineno, obj
