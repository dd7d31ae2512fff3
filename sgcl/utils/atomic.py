"""Atomic outputs and cross-process locks.

Every output of the toolkit is written under a temporary name in the destination folder and
renamed into place when complete, so a reader never sees a partial file and an interrupted run
leaves nothing that a re-run could mistake for a result. :func:`ensure_writable_dir` checks an output
folder before a command starts any work, and :func:`os_error_message` is the one-line message the
``sgcl`` dispatcher prints for a filesystem error (read-only, disk full, permission).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"
# errors that hit every later write to the same filesystem: a cohort stops at the first one
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
FREE_SPACE_MARGIN = 1 << 20  # bytes left free beyond what a block needs (file metadata, other writers)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` when the block succeeds.

    On an exception the temporary file is removed and ``dest`` is left untouched. A writer that fails
    on a full disk without saying so (torch.save, safetensors and HDF5 raise ``RuntimeError`` and the
    like) is reported as ``OSError(ENOSPC)`` naming ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {dest}: nothing was written to {tmp}")
        os.replace(tmp, dest)
    except Exception as exc:
        if not isinstance(exc, OSError) and _disk_full(dest.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest)) from exc
        raise
    finally:
        with contextlib.suppress(OSError):  # never hide the error that stopped the write
            tmp.unlink(missing_ok=True)


def atomic_write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def atomic_write_json(dest: str | Path, obj: object) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class UnwritableDirError(OSError):
    """An output folder that cannot be created or written (``filename`` is the folder)."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (with its parents) and prove that a file can be written in it.

    Raises :class:`UnwritableDirError` (an ``OSError`` with the system's errno and ``filename`` = the
    folder: read-only filesystem, no permission, disk full, a file in the way) so that a command
    stops before any work instead of failing at its first output, or once per slide.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file, not a folder, has that name
        raise UnwritableDirError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    except OSError as exc:
        raise UnwritableDirError(exc.errno, exc.strerror, exc.filename or str(path)) from None
    probe = path / f".sgcl-write-test.{os.getpid()}{TMP_SUFFIX}"  # removable by remove_stale_temporaries
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0")  # a full disk refuses the first block
        finally:
            os.close(fd)
    except OSError as exc:
        raise UnwritableDirError(exc.errno, exc.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return path


def ensure_free_space(folder: str | Path, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``folder`` when its filesystem has less than ``nbytes`` (plus
    ``FREE_SPACE_MARGIN``) free. Writers of HDF5 files call it before each block: HDF5 does not recover
    from a disk that fills up in the middle of a file (its objects can crash the process when freed)."""
    usage = shutil.disk_usage(folder)
    need = int(nbytes) + FREE_SPACE_MARGIN
    if usage.total > 0 and usage.free < need:  # total 0: a filesystem that keeps no statistics (some FUSE mounts)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {need / 1e6:.1f} MB needed, "
                                    f"{usage.free / 1e6:.1f} MB free", str(folder))


def _disk_full(folder: Path) -> bool:
    """The filesystem of ``folder`` has less than ``FREE_SPACE_MARGIN`` left (unknown: False)."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.total > 0 and usage.free < FREE_SPACE_MARGIN


def os_error_message(exc: OSError) -> str:
    """One line for a filesystem error: the path, the system's reason and errno, and the fix."""
    if exc.errno:
        text = str(exc.strerror or "")
        words = text if text and "\n" not in text and len(text) < 120 else os.strerror(exc.errno)  # HDF5's span lines
        reason = f"{words} (errno {exc.errno})"
    else:
        reason = str(exc).splitlines()[0]
    path = exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path or 'the output'}: {reason}; free space there or choose another --out"
    if isinstance(exc, UnwritableDirError) or exc.errno == errno.EROFS:
        return f"cannot write {path or 'the output'}: {reason}; choose another --out or fix its permissions"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: {reason}; fix its permissions" if path else f"{reason}; check the permissions"
    return f"{path}: {reason}" if path else reason


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by killed processes (``.*.<pid>.tmp`` whose pid is gone)."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for path in folder.glob(f".*{TMP_SUFFIX}"):
        try:
            pid = int(path.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockBusy(RuntimeError):
    """Another live process holds the lock."""


class FileLock:
    """An exclusive lock file created with ``O_CREAT | O_EXCL`` (safe on shared filesystems).

    The file records host, pid and time. A lock left by a dead process on this host, or older
    than ``stale_after`` seconds, is broken and taken over.
    """

    def __init__(self, path: str | Path, stale_after: float = 24 * 3600):
        self.path = Path(path)
        self.stale_after = stale_after
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._is_stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise LockBusy(f"{self.path} is held by another process ({self._owner()})") from None
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, fh)
            self.held = True
            return
        raise LockBusy(f"{self.path}: could not take the lock")

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _is_stale(self) -> bool:
        info = self._owner()
        if not info:  # being written right now, or unreadable: judge by age only
            try:
                return time.time() - self.path.stat().st_mtime > self.stale_after
            except FileNotFoundError:
                return True
        if time.time() - float(info.get("time", 0)) > self.stale_after:
            return True
        if info.get("host") == socket.gethostname():
            return not _pid_alive(int(info.get("pid", -1)))
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
