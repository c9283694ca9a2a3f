"""A trial spread over two nodes, on one machine: the two-node cluster of tests/two_node_cluster.py (the head's
MLflow server with its logins, S3 from moto) runs one real 2-worker ``train()`` trial with ``--placement spread``:
one Ray Train worker per node, checkpoints through the s3:// storage, the run in the head's MLflow.

Slow (a few minutes): run by the cluster step of .ci/run.
"""

from __future__ import annotations

import pytest
from tiny_run import tiny_overrides

pytest_plugins = ["two_node_cluster"]  # its fixtures: bucket, s3, mlflow_server, cluster
pytestmark = pytest.mark.slow
TWO_NODE_CPUS = (1, 1)  # one Ray Train worker of 1 CPU fits on each node, not two on one


def test_a_two_worker_trial_spreads_over_both_nodes(cluster, s3, bucket, mlflow_server, assets, tmp_path,
                                                    monkeypatch):  # fmt: skip
    from mlflow.tracking import MlflowClient
    from ray import tune

    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import Tracker
    from clipzss.sweep.shape import TrialShape
    from clipzss.sweep.trainable import run_trial

    nodes, worker = cluster
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # a loaded machine starts workers slowly
    uri = mlflow_server.uri
    parent = Tracker(TrackingConfig(uri=uri), tmp_path / "parent", run_name="spread")
    fixed = tiny_overrides(assets, tmp_path / "unused", **{"tracking.uri": uri})
    shape = TrialShape(2, cpus_per_worker=1.0, gpus_per_worker=0.0, placement="spread")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, config="voc", fixed=fixed, parent_run_id=parent.run_id, shape=shape,
                             max_failures=0),
        lambda sample: tune.PlacementGroupFactory([shape.resources(sample)]),
    )  # fmt: skip
    result = tune.Tuner(
        trainable,
        param_space={"student.arch": "segformer_tiny"},
        tune_config=tune.TuneConfig(time_budget_s=900),  # a trial that cannot be placed fails the test, not hangs it
        run_config=tune.RunConfig(name="spread", storage_path=f"s3://{bucket}/sweeps"),
    ).fit()[0]
    assert result.error is None, result.error
    assert sorted(result.metrics["worker_nodes"].split(",")) == sorted([nodes.head_node.node_id, worker.node_id])

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="sweeps/spread/").get("Contents", [])]
    steps = sorted(k.rsplit("/", 1)[1] for k in keys if "/workers/checkpoint_" in k and k.endswith(".pt"))
    assert steps == ["step_00000002.pt", "step_00000004.pt"], keys  # rank 0's checkpoints, uploaded by Ray Train

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clipzss").experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.run_id}'")  # fmt: skip
    assert run.info.status == "FINISHED" and run.data.params["run.world_size"] == "2"
    assert run.data.tags["mlflow.user"] == mlflow_server.trials.username
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/hIoU")][-1] == 4
