"""Correct on many nodes, on one machine: a Ray cluster of a head and a worker node (``ray.cluster_utils.Cluster``),
the head's MLflow server published as cluster.yaml publishes it, and S3 served by moto's server standing in for the
bucket (credentials in every node's environment, as the instance profile gives them on AWS). A trial placed on the
worker logs to the server found through the cluster, its artifact lands in S3 through the server, its checkpoint
goes to s3:// storage, and it sees no path of the driver's working directory.

Slow (about 30-40 s): run by the cluster step of .ci/run with tests/test_cluster_launcher.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from local_head import REPO, free_port

pytestmark = pytest.mark.slow
BUCKET = "clipzss-test"


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


@pytest.fixture
def mlflow_server(s3, tmp_path):
    """The head's MLflow server as cluster.yaml starts it (cluster/mlflow_head.py): SQLite backend backed up to S3,
    artifacts in S3, bound to loopback (the test's 'private address'). Yields its port."""
    port = free_port()
    (tmp_path / "head").mkdir()
    log = (tmp_path / "mlflow.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cluster" / "mlflow_head.py"), "--store", f"s3://{BUCKET}/mlflow",
         "--host", "127.0.0.1", "--port", str(port), "--db", str(tmp_path / "head" / "mlflow.db"), "--every", "5"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"mlflow server did not start: {(tmp_path / 'mlflow.log').read_text()[-3000:]}"
                ) from e
            time.sleep(0.5)
    yield port
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def cluster(mlflow_server, monkeypatch):
    """Head (no CPUs: trials cannot run there) publishing the MLflow port, plus one worker node; both on loopback,
    with a Ray temp folder of their own (no other Ray on this machine joins or is joined)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from clipzss.sweep.endpoints import MLFLOW_PORT_LABEL

    ray_tmp = tempfile.mkdtemp(prefix="czray", dir="/tmp")  # short: Ray's unix sockets live there
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    # Ray's switch that keeps every address it resolves on loopback (else "127.0.0.1" becomes the interface's IP):
    # read at import, so set for the nodes (environment) and for this already-imported driver (constant)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    head_args = {**node, "num_cpus": 0, "labels": {MLFLOW_PORT_LABEL: str(mlflow_server)}}
    nodes = Cluster(initialize_head=True, head_node_args=head_args)
    worker = nodes.add_node(**node, num_cpus=1)
    ray.init(address=nodes.address)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests folder
    yield nodes, worker
    ray.shutdown()
    nodes.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _worker_trial(config: dict) -> None:
    """Logs one run to the cluster's MLflow server (with an artifact) and reports one checkpoint."""
    import tempfile

    import ray
    from ray import tune

    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import Tracker

    trial_dir = Path(tune.get_context().get_trial_dir())
    tracker = Tracker(TrackingConfig(uri=config["tracking_uri"], experiment="multinode"), trial_dir / "mlflow",
                      run_name="worker trial")  # fmt: skip
    tracker.log_metrics({"val/hIoU": 12.5}, step=1)
    tracker.log_dict({"node": ray.get_runtime_context().get_node_id()}, "where.json")
    tracker.finish()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "step_000001.pt").write_bytes(b"weights")
        tune.report(
            {"val/hIoU": 12.5, "node_id": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(),
             "trial_dir": str(trial_dir), "run_id": tracker.run_id},
            checkpoint=tune.Checkpoint.from_directory(folder),
        )  # fmt: skip


def _backed_up_run_ids(s3, tmp_path: Path) -> set[str]:
    import sqlite3

    copy = tmp_path / "backup.db"
    try:
        s3.download_file(BUCKET, "mlflow/mlflow.db", str(copy))
    except s3.exceptions.ClientError:
        return set()
    with sqlite3.connect(copy) as db:
        return {row[0] for row in db.execute("select run_uuid from runs")}


def test_a_worker_trial_logs_to_the_heads_server_and_checkpoints_to_s3(cluster, s3, mlflow_server, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    from mlflow.tracking import MlflowClient
    from ray import tune

    from clipzss.sweep.endpoints import MLFLOW_PORT_LABEL, cluster_tracking_uri

    nodes, worker = cluster
    driver_dir = tmp_path / "driver_working_dir"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    uri = cluster_tracking_uri()
    assert uri == f"http://127.0.0.1:{mlflow_server}"  # found through Ray, not typed in

    tuner = tune.Tuner(
        tune.with_resources(_worker_trial, {"cpu": 1}),
        param_space={"tracking_uri": uri},
        tune_config=tune.TuneConfig(time_budget_s=300),  # a trial that cannot be placed fails the test, not hangs it
        run_config=tune.RunConfig(name="multinode", storage_path=f"s3://{BUCKET}/sweeps"),
    )
    result = tuner.fit()[0]
    assert result.error is None, result.error
    metrics = result.metrics
    assert metrics["node_id"] == worker.node_id  # the trial ran on the worker node
    for path in (metrics["cwd"], metrics["trial_dir"]):
        assert str(driver_dir) not in path and str(tmp_path) not in path

    run = MlflowClient(tracking_uri=uri).get_run(metrics["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/hIoU"] == 12.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server, not to a node disk
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.startswith("mlflow/artifacts/") and k.endswith("where.json") for k in keys), keys
    assert result.checkpoint.path.startswith(f"{BUCKET}/sweeps/multinode/")
    assert any(k.startswith("sweeps/multinode/") and k.endswith("step_000001.pt") for k in keys), keys

    # the backend outlives the head: its backup in S3 holds the run
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _backed_up_run_ids(s3, tmp_path) >= {metrics["run_id"]}:
        time.sleep(1)
    assert metrics["run_id"] in _backed_up_run_ids(s3, tmp_path)

    # a second node publishing another server: a sweep must not guess which one
    nodes.add_node(num_cpus=0, node_ip_address="127.0.0.1", labels={MLFLOW_PORT_LABEL: str(mlflow_server + 1)})
    with pytest.raises(RuntimeError, match="several nodes publish"):
        cluster_tracking_uri()
