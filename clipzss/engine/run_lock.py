"""One process at a time in a run directory: an advisory ``flock`` on ``<run>/.lock`` (and :func:`waiting_lock`,
the blocking kind, for a short critical section shared by processes).

The kernel drops the lock when its holder exits in any way (kill -9 included), so a crashed run never leaves a
stale lock behind. The file records who holds it (pid, host, start time) for the message the next comer reads.
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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            raise RunDirBusyError(
                f"{output_dir} is in use by {holder} (lock {path}). Wait for that run to end, or give this one "
                "another run.output_dir."
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the body, waiting for other holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
