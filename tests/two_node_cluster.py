"""Fixtures of a two-node Ray cluster on one machine, set up as cluster/cluster.yaml sets up AWS: a head (no CPUs)
publishing its MLflow server, one worker node (1 CPU), S3 served by moto's server standing in for the bucket.

The MLflow server is cluster/mlflow_head.py with MLflow's authentication: its logins are made by cluster/mlflow_auth.py
in the test's folder, and the trials' login is in the environment every Ray node starts with (what each node's
``~/.bashrc`` exports on AWS), so a trial finds it as a cluster's trial does. A test file uses them as a plugin:

    pytest_plugins = ["two_node_cluster"]  # bucket, s3, mlflow_server, cluster

    def test_something(cluster, mlflow_server):  # cluster: (ray.cluster_utils.Cluster, the worker node)
        ...  # mlflow_server.uri, .admin, .trials; ray is connected to the cluster

The head has no CPUs and the worker one, so a 1-CPU trial must run on the worker. A module that needs other sizes
(e.g. one Ray Train worker on each node) sets ``TWO_NODE_CPUS = (head, worker)`` at its top.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from local_head import REPO, free_port

BUCKET = "clipzss-test"


@pytest.fixture
def bucket() -> str:
    """The S3 bucket of the cluster (created by ``s3``)."""
    return BUCKET


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with one bucket; its endpoint and fake keys in the environment."""
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


@dataclass(frozen=True)
class MlflowServer:
    port: int
    uri: str
    admin: Any  # mlflow_auth.Login of the server's admin
    trials: Any  # mlflow_auth.Login the trials log as (not an admin)


def _wait_until_healthy(proc: subprocess.Popen, port: int, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}") from e
            time.sleep(0.5)


@pytest.fixture
def mlflow_server(s3, tmp_path, monkeypatch):
    """The head's MLflow server as cluster.yaml starts it (cluster/mlflow_head.py): basic auth, SQLite backend backed
    up to S3, artifacts in S3, bound to loopback (the test's 'private address')."""
    monkeypatch.syspath_prepend(str(REPO / "cluster"))
    auth = importlib.import_module("mlflow_auth")
    port = free_port()
    (tmp_path / "head").mkdir()
    log = tmp_path / "mlflow.log"
    auth_dir = tmp_path / "head" / ".clipzss"
    subprocess.run([sys.executable, str(REPO / "cluster" / "mlflow_auth.py"), "--dir", str(auth_dir)], check=True,
                   capture_output=True)  # fmt: skip  # as head_setup_commands does, before the server
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "cluster" / "mlflow_head.py"), "--store", f"s3://{BUCKET}/mlflow",
             "--host", "127.0.0.1", "--port", str(port), "--db", str(tmp_path / "head" / "mlflow.db"),
             "--every", "5", "--auth-dir", str(auth_dir)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _wait_until_healthy(proc, port, log)
    admin, trials = auth.ensure_logins(auth_dir)
    yield MlflowServer(port, f"http://127.0.0.1:{port}", admin, trials)
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def cluster(mlflow_server, monkeypatch, request):
    """Head publishing the MLflow port (no CPUs by default: trials cannot run there) plus one worker node (1 CPU),
    both on loopback, with a Ray temp folder of their own (no other Ray on this machine joins or is joined). Every
    node starts with the trials' MLflow login in its environment, so do the trials (and this driver)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from clipzss.sweep.endpoints import MLFLOW_PORT_LABEL

    for key, value in mlflow_server.trials.env().items():
        monkeypatch.setenv(key, value)
    ray_tmp = tempfile.mkdtemp(prefix="czray", dir="/tmp")  # short: Ray's unix sockets live there
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    # Ray's switch that keeps every address it resolves on loopback (else "127.0.0.1" becomes the interface's IP):
    # read at import, so set for the nodes (environment) and for this already-imported driver (constant)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    head_cpus, worker_cpus = getattr(request.module, "TWO_NODE_CPUS", (0, 1))
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    head_args = {**node, "num_cpus": head_cpus, "labels": {MLFLOW_PORT_LABEL: str(mlflow_server.port)}}
    nodes = Cluster(initialize_head=True, head_node_args=head_args)
    worker = nodes.add_node(**node, num_cpus=worker_cpus)
    ray.init(address=nodes.address)
    ray.cloudpickle.register_pickle_by_value(request.module)  # workers need not import the tests folder
    yield nodes, worker
    ray.shutdown()
    nodes.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
