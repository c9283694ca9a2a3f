"""The cluster's one MLflow tracking server, run on the head by cluster/cluster.yaml (nohup, until the head ends).

    python cluster/mlflow_head.py --store s3://BUCKET/clipzss-mlflow [--host IP] [--port 5000] [--every 60]

Durable without a database service: the backend is SQLite on the head, restored from ``<store>/mlflow.db`` at start
and copied back every ``--every`` seconds with SQLite's online backup (a copy is never half-written), so the runs
outlive ``ray down``; artifacts go to ``<store>/artifacts`` through the server (trials need no S3 rights for them).
Bound to ``--host`` (default: this machine's private address) with ``--allowed-hosts``: reachable inside the
cluster's network only, never on 0.0.0.0; the UI is opened through an ssh tunnel (README, "MLflow server access").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _bucket_key(uri: str, name: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"--store {uri!r}: an s3://BUCKET/PREFIX URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, f"{prefix.strip('/')}/{name}".lstrip("/")


def restore(s3, store: str, db: Path) -> bool:
    """Copy ``<store>/mlflow.db`` to ``db`` when the store has one and ``db`` does not exist yet."""
    if db.exists():
        return False
    bucket, key = _bucket_key(store, "mlflow.db")
    try:
        s3.download_file(bucket, key, str(db))
    except s3.exceptions.ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchKey"):
            raise
        return False
    return True


def back_up(s3, store: str, db: Path) -> None:
    """Upload a consistent snapshot of ``db`` (SQLite's online backup) to ``<store>/mlflow.db``."""
    bucket, key = _bucket_key(store, "mlflow.db")
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "mlflow.db"
        with sqlite3.connect(db) as source, sqlite3.connect(snapshot) as copy:
            source.backup(copy)
        s3.upload_file(str(snapshot), bucket, key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/mlflow_head.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="s3://BUCKET/PREFIX holding mlflow.db and artifacts/")
    p.add_argument("--host", default="", help="address to bind (default: this machine's private address)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--db", default=str(Path.home() / "mlflow.db"), help="the SQLite backend on this machine")
    p.add_argument("--every", type=float, default=60, help="seconds between backups of the backend to --store")
    a = p.parse_args(argv)
    import boto3

    s3 = boto3.client("s3")
    db = Path(a.db).resolve()
    print("restored" if restore(s3, a.store, db) else "new", f"MLflow store {db}", flush=True)
    host = a.host or socket.gethostbyname(socket.gethostname())
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(a.port), "--workers", "1",
         "--allowed-hosts", f"{host}:{a.port},localhost:{a.port},127.0.0.1:{a.port}",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", f"{a.store.rstrip('/')}/artifacts"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    print(
        f"MLflow server http://{host}:{a.port} (pid {server.pid}); backend copied to {a.store} every {a.every} s",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped head still makes its last backup
    try:
        while server.poll() is None:
            time.sleep(a.every)
            if db.exists():
                back_up(s3, a.store, db)
    finally:
        server.terminate()
        server.wait()
        if db.exists():
            back_up(s3, a.store, db)
    return server.returncode


if __name__ == "__main__":
    sys.exit(main())
