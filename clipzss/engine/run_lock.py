"""One process at a time in a run directory: an advisory ``flock`` on ``<run>/.lock`` (and :func:`waiting_lock`,
the blocking kind, for a short critical section shared by processes).

The kernel drops the lock when its holder exits in any way (kill -9 included), so a crashed run never leaves a
stale lock behind. The file records who holds it (pid, host, start time) for the message the next comer reads, and
its holder removes it on release, so a run folder or a store keeps no lock file once nobody works in it. A waiter
may then hold a lock on a file no longer at that path; it checks, after locking, that the path is still its file,
and locks again otherwise, so two holders never believe they hold one lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory; the message names it."""


@contextmanager
def run_dir_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold ``output_dir`` exclusively for the body; raise :class:`RunDirBusyError` at once if another process does.

    Yields:
        The lock file's path.
    """
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(path, blocking=False)
    except BlockingIOError:
        raise RunDirBusyError(
            f"{output_dir} is in use by {_holder(path)} (lock {path}). Wait for that run to end, or give this one "
            "another run.output_dir."
        ) from None
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        try:
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds without its note
            pass
        yield path
    finally:
        _release(path, fd)


@contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the body, waiting for other holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, blocking=True)
    try:
        yield
    finally:
        _release(path, fd)


def _lock(path: Path, blocking: bool) -> int:
    """A descriptor of the file at ``path`` with an exclusive flock on it (BlockingIOError: held, not blocking)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_at(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file it released: lock the one at the path now


def _is_at(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "an unknown process"
    except FileNotFoundError:
        return "an unknown process"


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while holding it, then close it (closing releases the lock)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
