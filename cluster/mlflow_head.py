"""The cluster's one MLflow tracking server, run on the head by cluster/cluster.yaml (nohup, until the head ends).

    python cluster/mlflow_head.py --store s3://BUCKET/clipzss-mlflow [--host IP] [--port 5000] [--every 60]
        [--auth-dir ~/.clipzss]

Durable without a database service: the backend is SQLite on the head, restored from ``<store>/mlflow.db`` at start
and copied back every ``--every`` seconds with SQLite's online backup (a copy is never half-written), so the runs
outlive ``ray down``; so is the users' database of MLflow's authentication (``<store>/mlflow-auth.db``: users,
password hashes, permissions). Artifacts go to ``<store>/artifacts`` through the server (trials need no S3 rights).
Every request needs a login (``--app-name basic-auth``; the logins in ``--auth-dir``, cluster/mlflow_auth.py). Bound
to ``--host`` (default: this machine's private address) with ``--allowed-hosts``: reachable inside the cluster's
network only, never on 0.0.0.0; the UI is opened through an ssh tunnel (docs/pages/clusters.md).
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

import mlflow_auth  # beside this file: python puts a script's folder first on sys.path

AUTH_DB = "mlflow-auth.db"  # beside the backend, on the head and in the store


def _bucket_key(uri: str, name: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"--store {uri!r}: an s3://BUCKET/PREFIX URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, f"{prefix.strip('/')}/{name}".lstrip("/")


def restore(s3, store: str, db: Path, name: str = "mlflow.db") -> bool:
    """Copy ``<store>/<name>`` to ``db`` when the store has one and ``db`` does not exist yet."""
    if db.exists():
        return False
    bucket, key = _bucket_key(store, name)
    try:
        s3.download_file(bucket, key, str(db))
    except s3.exceptions.ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchKey"):
            raise
        return False
    return True


def back_up(s3, store: str, db: Path, name: str = "mlflow.db") -> None:
    """Upload a consistent snapshot of ``db`` (SQLite's online backup) to ``<store>/<name>``."""
    bucket, key = _bucket_key(store, name)
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "mlflow.db"
        with sqlite3.connect(db) as source, sqlite3.connect(snapshot) as copy:
            source.backup(copy)
        s3.upload_file(str(snapshot), bucket, key)


def start_server(db: Path, auth_dir: Path, store: str, host: str, port: int) -> subprocess.Popen:
    """``mlflow server --app-name basic-auth`` on ``db``, its users provisioned first (cluster/mlflow_auth.py)."""
    admin, trials = mlflow_auth.ensure_logins(auth_dir)
    auth_db = db.with_name(AUTH_DB)
    mlflow_auth.provision(auth_db, admin, trials, tracking=db)
    config = mlflow_auth.write_config(auth_dir, auth_db, admin)
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
         "--workers", "1", "--allowed-hosts", f"{host}:{port},localhost:{port},127.0.0.1:{port}",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", f"{store.rstrip('/')}/artifacts"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(config),
             "MLFLOW_FLASK_SERVER_SECRET_KEY": mlflow_auth.server_secret(auth_dir)},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/mlflow_head.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="s3://BUCKET/PREFIX holding mlflow.db and artifacts/")
    p.add_argument("--host", default="", help="address to bind (default: this machine's private address)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--db", default=str(Path.home() / "mlflow.db"), help="the SQLite backend on this machine")
    p.add_argument("--every", type=float, default=60, help="seconds between backups of the backend to --store")
    p.add_argument("--auth-dir", default=str(Path.home() / ".clipzss"), help="the logins (cluster/mlflow_auth.py)")
    a = p.parse_args(argv)
    import boto3

    s3 = boto3.client("s3")
    db = Path(a.db).resolve()
    databases = {"mlflow.db": db, AUTH_DB: db.with_name(AUTH_DB)}
    for name, path in databases.items():
        print("restored" if restore(s3, a.store, path, name) else "new", f"{path}", flush=True)
    host = a.host or socket.gethostbyname(socket.gethostname())
    server = start_server(db, Path(a.auth_dir), a.store, host, a.port)
    print(
        f"MLflow server http://{host}:{a.port} (pid {server.pid}, basic auth); backend copied to {a.store} "
        f"every {a.every} s",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped head still makes its last backup
    try:
        while server.poll() is None:
            time.sleep(a.every)
            _back_up_all(s3, a.store, databases)
    finally:
        server.terminate()
        server.wait()
        _back_up_all(s3, a.store, databases)
    return server.returncode


def _back_up_all(s3, store: str, databases: dict[str, Path]) -> None:
    for name, path in databases.items():
        if path.exists():
            back_up(s3, store, path, name)


if __name__ == "__main__":
    sys.exit(main())
