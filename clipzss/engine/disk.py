"""Full disks, in words: is an error a full disk, how much room is left, and which disk a store writes to.

Every message about a full disk names the disk and its free space, so that a user frees the right one instead of
looking for a tracking server that is fine.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` says a disk (this machine's, or a store's own) has no room: an ``ENOSPC``-like OSError, or
    a store error whose message says so (SQLite's "database or disk is full", through SQLAlchemy or a server)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(words in str(error).lower() for words in DISK_FULL_WORDS)


def free_mib(path: str | Path) -> float:
    """Free space on the disk holding ``path`` (or its nearest existing folder), in MiB."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**20


def store_disk(uri: str) -> str:
    """The disk a tracking store writes to, for a message: a SQLite file's folder and its free space, else the
    server's own disk."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        return f"the disk holding {folder} ({free_mib(folder):.1f} MiB free)"
    return "the disk of the tracking server"
