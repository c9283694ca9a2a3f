"""A polite stop: SIGTERM (what schedulers, Ray and ``kill`` send) asks the trainer to stop after the current step.

The trainer then writes a checkpoint and ends its MLflow run as KILLED instead of dying mid-step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class RunTerminated(Exception):
    """The run stopped on SIGTERM after writing a checkpoint; ``--resume`` continues it."""

    exit_code = 128 + signal.SIGTERM


class StopRequest:
    """While entered (on the main thread), SIGTERM sets :attr:`requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
