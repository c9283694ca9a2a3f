"""Correct on many nodes, on one machine: a Ray cluster of a head and a worker node (``ray.cluster_utils.Cluster``),
the head's MLflow server published as cluster.yaml publishes it, and S3 served by moto's server standing in for the
bucket (credentials in every node's environment, as the instance profile gives them on AWS); fixtures in
tests/two_node_cluster.py. A trial placed on the worker logs to the server found through the cluster, as the trials'
MLflow user, its artifact lands in S3 through the server, its checkpoint goes to s3:// storage, and it sees no path
of the driver's working directory. Nobody without a login can write anything, and a user other than the sweeps'
cannot touch their registered model.

Slow (about 1-2 min): run by the cluster step of .ci/run with tests/test_cluster_launcher.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest_plugins = ["two_node_cluster"]  # its fixtures: bucket, s3, mlflow_server, cluster

pytestmark = pytest.mark.slow


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
             "trial_dir": str(trial_dir), "run_id": tracker.run_id,
             "login": os.environ.get("MLFLOW_TRACKING_USERNAME", "")},
            checkpoint=tune.Checkpoint.from_directory(folder),
        )  # fmt: skip


def _check_only_the_sweeps_user_writes(server, run) -> None:
    """Anonymous clients get 401 on every write (a run, an artifact, a model version, an alias), another user 403 on
    the sweeps' experiment and model, and the sweeps' user cannot make users: nothing of the sweep changes."""
    import requests
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)  # the sweeps' login, from the environment (the driver's)
    model = "clipzss-multinode"
    client.create_registered_model(model)
    source = f"{run.info.artifact_uri}/where.json"
    version = client.create_model_version(model, source=source, run_id=run.info.run_id).version
    client.set_registered_model_alias(model, "sweep", version)

    api = f"{server.uri}/api/2.0"
    admin = (server.admin.username, server.admin.password)
    alice = ("alice", "a-password-of-alice")
    created = requests.post(f"{api}/mlflow/users/create", json={"username": alice[0], "password": alice[1]},
                            auth=admin, timeout=30)  # fmt: skip
    assert created.status_code == 200, created.text
    artifact = run.info.artifact_uri.split("mlflow-artifacts:/", 1)[1]
    writes = {
        "create a run": ("post", "mlflow/runs/create", {"json": {"experiment_id": run.info.experiment_id}}),
        "upload an artifact": ("put", f"mlflow-artifacts/artifacts/{artifact}/evil.pt", {"data": b"payload"}),
        "create a model version": ("post", "mlflow/model-versions/create",
                                   {"json": {"name": model, "source": source, "run_id": run.info.run_id}}),
        "set an alias": ("post", "mlflow/registered-models/alias",
                         {"json": {"name": model, "alias": "sweep", "version": "1"}}),
    }  # fmt: skip
    for who, auth, refused in (("anonymous", None, {401}), ("alice", alice, {403})):
        for what, (method, path, body) in writes.items():
            answer = requests.request(method, f"{api}/{path}", auth=auth, timeout=30, **body)
            assert answer.status_code in refused, (who, what, answer.status_code, answer.text[:300])
    trials = (server.trials.username, server.trials.password)
    made = requests.post(f"{api}/mlflow/users/create", json={"username": "mallory", "password": "x" * 16},
                         auth=trials, timeout=30)  # fmt: skip
    assert made.status_code == 403, made.text  # the sweeps' user is no admin
    assert client.get_model_version_by_alias(model, "sweep").version == version
    assert [v.version for v in client.search_model_versions(f"name = '{model}'")] == [version]
    assert not [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "evil.pt"]


def _backed_up_run_ids(s3, bucket: str, tmp_path: Path) -> set[str]:
    import sqlite3

    copy = tmp_path / "backup.db"
    try:
        s3.download_file(bucket, "mlflow/mlflow.db", str(copy))
    except s3.exceptions.ClientError:
        return set()
    with sqlite3.connect(copy) as db:
        return {row[0] for row in db.execute("select run_uuid from runs")}


def test_a_worker_trial_logs_to_the_heads_server_and_checkpoints_to_s3(cluster, s3, bucket, mlflow_server, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    from mlflow.tracking import MlflowClient
    from ray import tune

    from clipzss.sweep.endpoints import MLFLOW_PORT_LABEL, cluster_tracking_uri

    nodes, worker = cluster
    driver_dir = tmp_path / "driver_working_dir"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    uri = cluster_tracking_uri()
    assert uri == mlflow_server.uri  # found through Ray, not typed in

    tuner = tune.Tuner(
        tune.with_resources(_worker_trial, {"cpu": 1}),
        param_space={"tracking_uri": uri},
        tune_config=tune.TuneConfig(time_budget_s=300),  # a trial that cannot be placed fails the test, not hangs it
        run_config=tune.RunConfig(name="multinode", storage_path=f"s3://{bucket}/sweeps"),
    )
    result = tuner.fit()[0]
    assert result.error is None, result.error
    metrics = result.metrics
    assert metrics["node_id"] == worker.node_id  # the trial ran on the worker node
    for path in (metrics["cwd"], metrics["trial_dir"]):
        assert str(driver_dir) not in path and str(tmp_path) not in path

    run = MlflowClient(tracking_uri=uri).get_run(metrics["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/hIoU"] == 12.5
    assert metrics["login"] == "clipzss-sweeps"  # from the worker node's environment, not from the trial's config
    assert run.data.tags["mlflow.user"] == "clipzss-sweeps"  # the login the trial authenticated with
    secrets = (mlflow_server.trials.password, mlflow_server.admin.password)
    recorded = [*run.data.params.values(), *run.data.tags.values(), (tmp_path / "mlflow.log").read_text()]
    assert not [s for s in secrets for text in recorded if s in text]  # never a param, a tag or a log line
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server, not to a node disk
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("mlflow/artifacts/") and k.endswith("where.json") for k in keys), keys
    assert result.checkpoint.path.startswith(f"{bucket}/sweeps/multinode/")
    assert any(k.startswith("sweeps/multinode/") and k.endswith("step_000001.pt") for k in keys), keys

    _check_only_the_sweeps_user_writes(mlflow_server, run)

    # the backend outlives the head: its backup in S3 holds the run
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _backed_up_run_ids(s3, bucket, tmp_path) >= {metrics["run_id"]}:
        time.sleep(1)
    assert metrics["run_id"] in _backed_up_run_ids(s3, bucket, tmp_path)

    # a second node publishing another server: a sweep must not guess which one
    nodes.add_node(num_cpus=0, node_ip_address="127.0.0.1", labels={MLFLOW_PORT_LABEL: str(mlflow_server.port + 1)})
    with pytest.raises(RuntimeError, match="several nodes publish"):
        cluster_tracking_uri()
