"""A write-ahead spool between the trainer and MLflow: training never waits on the tracking server.

Every tracker call (``log_metrics``, ``log_params``, ``log_artifact``, ``finish``...) is first appended to a journal
in the run directory (``tracking_spool.jsonl``), then delivered in order by one background thread to the real
:class:`~clipzss.engine.tracking.Tracker`. The journal makes three promises:

- **Nothing is lost in an outage.** A call that fails for a network or server reason stays in the journal and is
  retried with back-off until the server answers; what is still undelivered when the run ends waits in the journal
  and is delivered by the next ``--resume`` of that folder.
- **Training is never blocked.** Appending a line is all the training thread does; the closing flush gives up once
  :data:`FLUSH_SECONDS` pass without a delivery.
- **A metric is committed once per (key, step).** A resumed run recomputes the steps after its last checkpoint
  (bit-identically); values already journalled for those steps are not logged again, and each metric carries the
  timestamp of its first journalling, so a redelivery after a crash is an exact duplicate that MLflow ignores.

- **A full disk stops nothing.** A journal line or a delivery position that cannot be written (no space left) is
  kept in memory and written when space returns, so delivery goes on; a torn line is cut off at once, so it never
  hides the lines after it. A store that cannot write because *its* disk is full is named as such, not as away.

A call the server *refuses* (a bad value, not an outage) is moved to ``tracking_spool.rejected.jsonl`` with the
server's answer, so one bad record cannot wedge the queue. NumPy arrays (images) travel as ``.npy`` files beside
the journal.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipzss.engine.disk import free_mib, is_disk_full, store_disk
from clipzss.engine.journal import CURSOR, JOURNAL, Journal, read_journal, read_position

REJECTED = "tracking_spool.rejected.jsonl"
ARRAYS = "tracking_spool_arrays"
FLUSH_SECONDS = 15.0  # the longest a run's end waits for an unreachable server
FLUSH_CAP_SECONDS = 600.0  # the longest it waits for a slow one that keeps answering
MAX_BACKOFF = 30.0
# MLflow error codes that mean "this request is wrong" rather than "the server is away".
REFUSALS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}


def is_outage(error: BaseException) -> bool:
    """True when ``error`` says the store is unreachable or busy (retry later), False when it refused the call."""
    code = getattr(error, "error_code", None)
    if code is not None:
        return code not in REFUSALS
    if isinstance(error, FileNotFoundError):
        return False
    library = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or library in ("requests", "urllib3", "sqlalchemy")


def _import_ipython_here() -> None:
    """Import IPython (if installed) in the calling thread, before the delivery thread exists. MLflow imports it
    lazily while delivering; a first import in that thread leaves a half-built module in ``sys.modules`` that
    matplotlib reads without the import lock when the training thread draws a picture (``AttributeError: partially
    initialized module 'IPython' has no attribute 'version_info'``, seen in a sweep trial)."""
    import importlib.util

    if importlib.util.find_spec("IPython") is not None:
        import IPython  # noqa: F401


class Spool:
    """Journal every tracker call in ``run_dir`` and deliver it to ``sink`` (a Tracker) from a background thread.

    Args:
        sink: the object whose methods are called on delivery (``Tracker``); must have ``uri`` and ``run_id``.
        run_dir: the run directory holding the journal.
        quiet_http: a context manager factory under which deliveries run (fail fast instead of MLflow's retries).
        continuing: the run goes on (``--resume``): an end status still waiting from its previous session is void.
    """

    def __init__(self, sink: Any, run_dir: str | Path, quiet_http=None, continuing: bool = False):
        self.sink, self.uri, self.run_id = sink, sink.uri, sink.run_id
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._journal = Journal(self.dir)
        self._journal_path = self._journal.path
        self._records = list(self._journal.records)
        self._delivered = self._journal.delivered
        waiting = range(self._delivered, len(self._records))
        self._void = {i for i in waiting if self._records[i]["op"] == "finish"} if continuing else set()
        self._stamps = {(k, r["args"][1]): r["kwargs"].get("timestamp_ms") for r in self._records
                        if r["op"] == "log_metrics" for k in r["args"][0]}  # fmt: skip  # (key, step) -> first stamp
        self._quiet_http = quiet_http
        self._wake = threading.Condition()
        self._closing = False
        self._in_call = False  # the delivery thread is inside a call to the store
        self.outage_since: float | None = None
        self.store_full = False  # the store's last failure said its disk is full
        _import_ipython_here()
        self._thread = threading.Thread(target=self._deliver_forever, name="clipzss-mlflow-spool", daemon=True)
        self._thread.start()

    # ---- the training side: append, never wait ----------------------------------------------------------------
    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *args, **kwargs: self._append(op, list(args), kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Journal the (key, step) pairs not journalled before, stamped now (or ``timestamp_ms``: when they were
        produced, for values copied from another journal)."""
        fresh = {k: float(v) for k, v in metrics.items() if (k, step) not in self._stamps and np.isfinite(v)}
        if fresh:
            stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            self._stamps.update({(k, step): stamp for k in fresh})
            self._append("log_metrics", [fresh, step], {"timestamp_ms": stamp})

    def log_model_metrics(self, metrics: dict[str, float], step: int, name: str = "student") -> None:
        """Journal metrics of the run's logged model, each with the stamp it was first logged to the run with at
        ``step`` (MLflow files a model's metric under its run too: the same stamp makes that an exact duplicate,
        which MLflow drops, so each (metric, step) stays once in the run's history)."""
        stamps = {k: self._stamps[(k, step)] for k in metrics if (k, step) in self._stamps}
        self._append("log_model_metrics", [{k: float(v) for k, v in metrics.items()}, step],
                     {"name": name, "timestamps_ms": stamps})  # fmt: skip

    def pending(self) -> int:
        with self._wake:
            return len(self._records) - self._delivered

    def _append(self, op: str, args: list, kwargs: dict) -> None:
        record = {"op": op, "args": [self._encode(a) for a in args], "kwargs": kwargs}
        try:
            line = json.dumps(record)
        except TypeError as e:
            raise TypeError(f"tracker call {op}: arguments cannot be journalled ({e})") from e
        with self._wake:
            self._records.append(record)
            self._journal.append(line)
            self._wake.notify()

    def _encode(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            folder = self.dir / ARRAYS
            folder.mkdir(exist_ok=True)
            path = folder / f"{len(self._records)}_{time.monotonic_ns()}.npy"
            np.save(path, value)
            return {"__ndarray__": str(path)}
        return str(value) if isinstance(value, Path) else value

    # ---- the delivery side ---------------------------------------------------------------------------------------
    def close(self, wait: float | None = None) -> int:
        """Stop after delivering what can be delivered until ``wait`` seconds pass without a delivery (default
        :data:`FLUSH_SECONDS`: a slow server that still answers is waited for, an absent one is not); returns the
        number of records left waiting in the journal."""
        wait = FLUSH_SECONDS if wait is None else wait
        deadline, cap = time.monotonic() + wait, time.monotonic() + FLUSH_CAP_SECONDS
        with self._wake:
            seen = self._delivered
            while self._delivered < len(self._records) and time.monotonic() < min(deadline, cap):
                self._wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                working = self._in_call and self.outage_since is None  # a long call (a model upload) on a live store
                if self._delivered > seen or working:
                    seen, deadline = self._delivered, time.monotonic() + wait
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 6)
        with self._wake:
            self._journal.write_waiting()
            self._journal.save_position(self._delivered)
            unwritten, left = self._journal.unwritten(), len(self._records) - self._delivered
            self._journal.close()
        if left:
            self._report_waiting(left)
        if unwritten:
            lost = min(unwritten, left)
            fate = f"{lost} of them did not reach MLflow either and are lost" if lost else "MLflow has them all"
            print(f"{unwritten} tracking record(s) could not be written to {self._journal_path} "
                  f"({free_mib(self.dir):.1f} MiB free on that disk); {fate}")  # fmt: skip
        return left

    def _report_waiting(self, left: int) -> None:
        why = f"could not write: {store_disk(self.uri)} is full" if self.store_full else "did not answer"
        print(
            f"MLflow at {self.uri} {why}: {left} tracking record(s) wait in {self._journal_path}; they are delivered "
            f"by `clipzss sync {self.dir}` or when this run is resumed (--resume)."
        )

    def _deliver_forever(self) -> None:
        backoff = min(1.0, MAX_BACKOFF)
        while True:
            with self._wake:
                while self._delivered >= len(self._records) and not self._closing:
                    self._wake.wait()
                if self._closing and (self._delivered >= len(self._records) or self.outage_since is not None):
                    return
                record, void = self._records[self._delivered], self._delivered in self._void
            self._in_call = True
            try:
                delivered = void or self._deliver(record)
            finally:
                self._in_call = False
            if delivered:
                backoff = min(1.0, MAX_BACKOFF)
                with self._wake:
                    self._delivered += 1
                    self._journal.write_waiting()
                    self._journal.save_position(self._delivered)
                    self._wake.notify_all()
            else:
                with self._wake:
                    self._wake.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF)

    def _deliver(self, record: dict) -> bool:
        """Deliver one record; False if the store is away or full (retry later). A refusal is set aside."""
        try:
            args = [np.load(a["__ndarray__"]) if _is_array(a) else a for a in record["args"]]
            if self._quiet_http is not None:
                with self._quiet_http():
                    getattr(self.sink, record["op"])(*args, **record["kwargs"])
            else:
                getattr(self.sink, record["op"])(*args, **record["kwargs"])
        except Exception as e:  # noqa: BLE001 - sorted into outage / refusal just below
            if is_outage(e):
                self._store_failed(e)
                return False
            self._set_aside(record, e)
        if self.outage_since is not None:
            print(f"MLflow at {self.uri} answers again after {time.monotonic() - self.outage_since:.0f} s")
            self.outage_since, self.store_full = None, False
        for a in record["args"]:
            if _is_array(a):
                Path(a["__ndarray__"]).unlink(missing_ok=True)
        return True

    def _store_failed(self, error: Exception) -> None:
        """Say once per outage what keeps the store from taking records: its full disk, or its absence."""
        full = is_disk_full(error)
        if self.outage_since is None or full != self.store_full:
            self.outage_since = self.outage_since or time.monotonic()
            why = f"cannot write: {store_disk(self.uri)} is full" if full else "is unreachable"
            print(f"MLflow at {self.uri} {why} ({type(error).__name__}); training goes on, tracking calls wait in "
                  f"{self._journal_path}")  # fmt: skip
        self.store_full = full

    def _set_aside(self, record: dict, error: Exception) -> None:
        print(f"MLflow refused {record['op']} ({error}); the call is kept in {self.dir / REJECTED}")
        try:
            with open(self.dir / REJECTED, "a") as f:
                f.write(json.dumps({**record, "error": f"{type(error).__name__}: {error}"}) + "\n")
        except OSError as e:  # a full disk: the refused call is at least on the console
            print(f"cannot keep it there ({e}): {json.dumps(record)[:2000]}")


def _is_array(arg: Any) -> bool:
    return isinstance(arg, dict) and "__ndarray__" in arg


def pending_records(run_dir: str | Path) -> int:
    """How many journalled records of ``run_dir`` are not yet delivered."""
    folder = Path(run_dir)
    records = len(read_journal(folder / JOURNAL))
    return records - read_position(folder, records)


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a previous run's journal out of the way (a fresh run in the same folder starts a new MLflow run).

    Returns:
        Where its undelivered records were kept (``tracking_spool.<time>.jsonl``), or None if all were delivered.
    """
    folder = Path(run_dir)
    journal, cursor = folder / JOURNAL, folder / CURSOR
    kept = None
    if pending_records(folder) > 0:
        kept = folder / f"tracking_spool.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        os.replace(journal, kept)
    journal.unlink(missing_ok=True)
    cursor.unlink(missing_ok=True)
    return kept
