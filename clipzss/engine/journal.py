"""The spool's two files in a run folder, kept true on a full disk: the journal and the delivery position.

The journal (``tracking_spool.jsonl``) is one JSON line per tracker call, appended with one ``write`` each. A write
that fails for want of space is cut back to the last whole line at once (truncating needs no space), so a torn line
never hides the lines after it; the line waits in memory and is written, in order, when space returns. The position
(``tracking_spool.delivered``, how many lines MLflow has) is replaced atomically through a ``.tmp`` file, which is
removed when the write fails, and it never counts a line the journal does not hold yet: a later session appending
to the journal then cannot take its new lines for delivered ones.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from clipzss.engine.disk import free_mib

JOURNAL = "tracking_spool.jsonl"
CURSOR = "tracking_spool.delivered"


def read_journal(path: Path) -> list[dict]:
    """The journal's records; a torn last line (a kill -9 or a full disk mid-write) is dropped."""
    return _whole_lines(path)[0]


def read_position(folder: Path, records: int) -> int:
    """How many of the journal's ``records`` were delivered (a missing position: none)."""
    cursor = folder / CURSOR
    return min(int(cursor.read_text()), records) if cursor.is_file() else 0


def _whole_lines(path: Path) -> tuple[list[dict], int]:
    """The records of the journal's whole lines up to the first torn one, and the length of those lines in bytes."""
    if not path.is_file():
        return [], 0
    records, size = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # a write cut short: its line was never whole
        try:
            records.append(json.loads(line))
        except ValueError:
            break
        size += len(line)
    return records, size


class Journal:
    """The journal and position files of ``folder``; the spool calls it under its own lock (not thread-safe).

    Attributes:
        records: every record of the journal's whole lines when it was opened (the spool appends to its own list).
        delivered: the position read from disk, at most ``len(records)``.
    """

    def __init__(self, folder: Path):
        self.path, self.cursor = folder / JOURNAL, folder / CURSOR
        self.records, self._size = _whole_lines(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size > self._size:
            os.ftruncate(self._fd, self._size)  # drop a torn tail before appending after it
        self.written = len(self.records)  # lines on disk
        self.delivered = read_position(folder, self.written)
        self._waiting: list[bytes] = []  # lines not yet on disk, in order
        self._trouble: str | None = None  # the file that last failed to write, while it fails

    def append(self, line: str) -> None:
        """Write one JSON line now, or keep it (after any lines already waiting) until space returns."""
        self._waiting.append(line.encode() + b"\n")
        self.write_waiting()

    def unwritten(self) -> int:
        """Lines kept in memory because the disk refused them."""
        return len(self._waiting)

    def write_waiting(self) -> None:
        """Write the lines that wait, in order, as far as the disk allows."""
        while self._waiting and self._fd >= 0:
            data = self._waiting[0]
            try:
                if os.write(self._fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as e:
                os.ftruncate(self._fd, self._size)  # cut a short write back to the last whole line
                self._failed(self.path, e)
                return
            self._size += len(data)
            self.written += 1
            self._waiting.pop(0)
            self._recovered(self.path)

    def save_position(self, delivered: int) -> None:
        """Record that ``delivered`` records reached MLflow (capped at the lines on disk); a failure is retried at
        the next call."""
        position = min(delivered, self.written)
        if position == self.delivered or self._fd < 0:
            return
        tmp = self.cursor.with_name(self.cursor.name + ".tmp")
        try:
            tmp.write_text(str(position))
            os.replace(tmp, self.cursor)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # it holds the space a retry needs
            self._failed(self.cursor, e)
            return
        self.delivered = position
        self._recovered(self.cursor)

    def close(self) -> None:
        """Close the journal; later writes are no-ops (a delivery thread that outlived the spool's close)."""
        os.close(self._fd)
        self._fd = -1

    def _failed(self, path: Path, error: OSError) -> None:
        if self._trouble is None:
            print(f"cannot write {path} ({error.strerror or error}; {free_mib(path):.1f} MiB free on that disk): "
                  "tracking goes on from memory, and the file is written when space returns")  # fmt: skip
        self._trouble = str(path)

    def _recovered(self, path: Path) -> None:
        if self._trouble == str(path):
            print(f"{path} is written again")
            self._trouble = None
