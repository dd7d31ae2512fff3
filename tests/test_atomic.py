"""Atomic outputs and O_EXCL locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sgcl.utils.atomic import FileLock, LockBusy, atomic_path, remove_stale_temporaries


def test_atomic_path_commits_on_success(tmp_path):
    dest = tmp_path / "out" / "a.txt"
    with atomic_path(dest) as tmp:
        tmp.write_text("hello")
        assert not dest.exists()
    assert dest.read_text() == "hello"
    assert list(dest.parent.iterdir()) == [dest]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_lock_is_exclusive_and_dead_owner_is_broken(tmp_path):
    path = tmp_path / "s.lock"
    with FileLock(path):
        with pytest.raises(LockBusy):
            FileLock(path).acquire()
    assert not path.exists()
    # a lock written by a process that has exited is stale and taken over
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    import socket, time
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "time": time.time()}))
    lock = FileLock(path)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_remove_stale_temporaries(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.h5.{int(proc.stdout)}.tmp"
    live = tmp_path / f".y.h5.{os.getpid()}.tmp"
    stale.write_text("x"); live.write_text("y")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists()


def test_atomic_path_reports_a_writer_failing_on_a_full_disk_as_enospc(tmp_path, monkeypatch):
    """torch.save, safetensors and HDF5 raise RuntimeError-like errors on a full disk: named as ENOSPC."""
    import errno
    import shutil

    dest = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError, match="boom"):  # a disk with room: the writer's own error
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("boom")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    with pytest.raises(OSError) as exc:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(dest)
    assert list(tmp_path.iterdir()) == []
