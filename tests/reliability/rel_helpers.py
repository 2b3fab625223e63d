"""Helpers of the reliability tests (a module, so tests can import it by name)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tagi_ds import cli


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `root`, hidden temp files included: "nothing written" means equal."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def tree_sha(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (hidden ones included), and every folder as '<dir>': the contents-level
    "nothing changed" check of issue 19 (a rewrite with other bytes, a new file or a new folder all show)."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_run(src: Path, dest_root: Path) -> Path:
    """A private copy of a run folder (same name under `dest_root`), so a test may damage or redo it."""
    dest = dest_root / src.name
    shutil.copytree(src, dest, symlinks=True)
    return dest


def cli_run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """The real CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def refused(capsys, argv: list[str], *watch: Path, match: str | list[str], fingerprint=tree_sha) -> str:
    """Run the CLI in-process; assert exit 2, one `tagi-ds <cmd>: error:` line containing every `match`, no
    traceback, and every watched folder unchanged by `fingerprint` (default sha256 of files and folders; `snapshot`:
    sizes and mtimes, so a rewrite with the same bytes shows too). Returns the message line, and prints it for the
    README's table (pytest -s)."""
    before = [fingerprint(w) for w in watch]
    rc, _, err = cli_run(capsys, argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("tagi-ds ")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0], err
    for m in [match] if isinstance(match, str) else match:
        assert m in lines[0], lines[0]
    for w, b in zip(watch, before):
        assert fingerprint(w) == b, f"{w} changed"
    with capsys.disabled():
        print(f"\n[{argv[0]}] rc={rc} intact=yes :: {lines[0]}")
    return lines[0]
