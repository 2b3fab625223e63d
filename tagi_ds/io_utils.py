"""Atomic file publication, hashing, file modes and stage locks, used by every stage that writes an artifact.

Every published file is written under a temporary name in the same folder, fsynced, then renamed, so a reader
never sees a partial file and a killed process leaves nothing under the final name. Published files and folders get
the modes `open()` / `mkdir()` would give under the process umask (files 0644, folders 0755 with umask 022), whatever
the writer created them with: `tempfile` and safetensors (which writes its own temp file and renames it) create
0600, which a colleague on a shared cluster cannot read.

A failed write is reported as an `OSError` naming the file, whatever library did the writing: torch's C++ stream
says only "basic_ios::clear: iostream error" for a full disk, safetensors wraps the errno in its own error type.

Stage locks (`file_lock`) are `fcntl.flock` locks on small files that record the holder (host, pid, command, time):
a second writer fails at once naming the holder, the OS releases a lock when its holder dies (even by SIGKILL), so a
lock left behind by a dead holder is simply taken over. A cleanly released lock file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import TagiError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask (0644 with umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ write errors
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")
_STREAM_FAILURES = ("iostream error", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def write_error(e: BaseException, path: Path) -> Optional[OSError]:
    """The OSError behind a failed write of `path` (None when `e` is not an I/O failure): libraries that write in
    native code report a full disk or a read-only folder in their own words."""
    if isinstance(e, OSError):
        if e.filename is None and e.errno is not None:
            return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
        return e
    text = str(e)
    m = _OS_ERROR_IN_TEXT.search(text)
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    if any(s in text for s in _STREAM_FAILURES):
        if _disk_full(path.parent if not path.is_dir() else path):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return OSError(errno.EIO, f"write failed ({text.strip()[:120]})", str(path))
    return None


def describe_os_error(e: OSError) -> str:
    """One line for a person: what failed, where, and what to do."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    where = f"{e.filename}: " if e.filename else ""
    if e.filename2:
        where = f"{e.filename} -> {e.filename2}: "
    hint = {errno.ENOSPC: "free space on that filesystem (or set runs_dir elsewhere) and rerun: finished work is kept",
            errno.EDQUOT: "the disk quota is exhausted: free space (or set runs_dir elsewhere) and rerun",
            errno.EROFS: "the folder is on a read-only filesystem: use another runs_dir (or --out)",
            errno.EACCES: "this user may not write there: fix the permissions or use another runs_dir (or --out)",
            errno.EPERM: "this user may not write there: fix the permissions or use another runs_dir (or --out)",
            errno.EFBIG: "the file exceeds the file-size limit of this process (ulimit -f)"}.get(e.errno or 0, "")
    return f"{where}{what}" + (f" ({name})" if name else "") + (f"; {hint}" if hint else "")


def _publish_modes(root: Path) -> None:
    """Give `root` (a file, or a folder and everything under it) the umask's modes."""
    fmode, dmode = file_mode(), dir_mode()
    if root.is_dir():
        os.chmod(root, dmode)
        for p in root.rglob("*"):
            if p.is_symlink():
                continue
            os.chmod(p, dmode if p.is_dir() else fmode)
    elif root.exists():
        os.chmod(root, fmode)


# ------------------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success fsync it and rename it onto `final`."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as e:
        raise write_error(e, final) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, file_mode())  # mkstemp creates 0600; published files follow the umask like open()
    try:
        yield tmp_path
        _publish_modes(tmp_path)  # a writer may have replaced the temp file (safetensors does): its mode again
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        err = write_error(e, final) if isinstance(e, Exception) else None
        if err is not None and err is not e:
            raise err from e
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a Python file object, so a full disk raises OSError(ENOSPC) naming the file (torch's own
    path writer only says "basic_ios::clear: iostream error"). Use inside `atomic_path`."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success rename it onto `final` (replacing an old one)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as e:
        raise write_error(e, final) from None
    os.chmod(tmp, dir_mode())  # mkdtemp creates 0700: a shared cluster filesystem needs the umask's bits
    try:
        yield tmp
        _publish_modes(tmp)  # safetensors and tempfile create 0600 files
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(e, final) if isinstance(e, Exception) else None
        if err is not None and err is not e:
            raise err from e
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """A stable hash of a JSON-able object (sorted keys), e.g. a resolved config section."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ locks
class LockHeldError(TagiError):
    """Another live process holds the lock of a folder this command would write."""


@dataclass
class _Held:
    path: Path
    fd: int


def _holder_info(stage: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "stage": stage,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _describe_holder(info: Optional[dict], path: Path) -> str:
    if not info:
        return f"another process (it is just starting; lock file {path})"
    return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} "
            f"(`{info.get('command', '?')}`; lock file {path})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_locked(path: Path, shared: bool, stage: str, log: Callable[[str], None]) -> Optional[_Held]:
    """Lock `path` (exclusive, or shared); raise LockHeldError naming the holder when another process has it.
    None when the folder cannot hold a lock file because it is not writable (then nobody can write there)."""
    for _ in range(50):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except FileNotFoundError:
            continue  # the lock folder was removed between mkdir and open by a releasing holder: again
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None  # read-only for this user: writes will fail and say so; no one can race us here
            raise write_error(e, path) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            info = None
            for _ in range(5):  # a holder that just locked writes its record right after
                info = _read_holder(fd)
                if info:
                    break
                time.sleep(0.02)
            os.close(fd)
            raise LockHeldError(f"{stage}: already being written by {_describe_holder(info, path)}. Two writers "
                                f"would corrupt it: wait for that process to finish (or stop it), then rerun; a lock "
                                f"whose holder died is taken over automatically") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log(f"warning: {path}: this filesystem has no file locks ({e.strerror}); running without one")
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # a releasing holder unlinked the file after we opened it: lock the new one
            os.close(fd)
            continue
        old = _read_holder(fd)
        if old and not shared and not (old.get("host") == socket.gethostname() and old.get("pid") == os.getpid()):
            alive = old.get("host") == socket.gethostname() and _pid_alive(int(old.get("pid", -1)))
            log(f"{stage}: taking over the lock {path} left by pid {old.get('pid')} on host {old.get('host')} "
                f"({'it holds no lock any more' if alive else 'no longer running'})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder_info(stage)).encode("utf-8"))
        return _Held(path, fd)
    raise OSError(errno.EAGAIN, "could not lock (the lock file kept changing)", str(path))


def _release(held: _Held) -> None:
    """Unlock; remove the lock file when no one else holds it (a shared lock may still have other holders)."""
    try:
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):
                if os.fstat(held.fd).st_ino == os.stat(held.path).st_ino:
                    held.path.unlink()
        except BlockingIOError:
            pass  # other shared holders: the file stays (theirs)
    finally:
        os.close(held.fd)
    with contextlib.suppress(OSError):
        held.path.parent.rmdir()  # only when empty


@contextlib.contextmanager
def file_lock(exclusive: Sequence[Path] = (), shared: Sequence[Path] = (), *, stage: str = "this stage",
              log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold flock locks on `shared` (LOCK_SH) and `exclusive` (LOCK_EX) lock files for the block: any conflicting
    holder makes this raise LockHeldError at once (no waiting), naming the holder's host, pid and command. The OS
    drops the locks when the process dies, so nothing is ever left locked."""
    held: list[_Held] = []
    try:
        for path, is_shared in [(Path(p), True) for p in shared] + [(Path(p), False) for p in exclusive]:
            h = _open_locked(path, is_shared, stage, log)
            if h is not None:
                held.append(h)
        yield
    finally:
        for h in reversed(held):
            _release(h)


def lock_holders(paths: Sequence[Path]) -> list[str]:
    """A description of each lock file of `paths` that a live process holds now (probed without waiting)."""
    busy = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            busy.append(_describe_holder(_read_holder(fd), Path(path)))
        except OSError:
            pass
        finally:
            os.close(fd)
    return busy
