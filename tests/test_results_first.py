"""What a user of MLflow finds first after a real (tiny) ``clipzss train --register-as``: the result in the run's
description, the printed links into the model-training view, the pictures as stepped images, a logged model with its
metrics and a registered version behind an alias."""

import pytest
from mlflow.tracking import MlflowClient
from tiny_run import tiny_overrides

from clipzss.cli import main as cli
from clipzss.engine.tracking import EXPERIMENT_TAGS, VIEW_KEY, runs_table_view


@pytest.fixture(scope="module")
def registered(assets, tmp_path_factory):
    """(client, run, output folder, printed text) of ``clipzss train <tiny> --register-as tiny-voc``."""
    out = tmp_path_factory.mktemp("results") / "run"
    log = out.parent / "stdout.txt"
    import contextlib

    with open(log, "w") as f, contextlib.redirect_stdout(f):
        assert cli(["train", *tiny_overrides(assets, out), "--register-as", "tiny-voc"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    return client, run, out, log.read_text()


def test_the_description_opens_with_the_result(registered):
    _, run, _, _ = registered
    first = run.data.tags["mlflow.note.content"].splitlines()[0]
    hiou = run.data.metrics["val/hIoU"]
    assert first.startswith(f"**hIoU {hiou:.2f}**") and "mIoU(U)" in first and "(val, step 4)" in first, first


def test_the_hint_opens_the_model_training_view_with_one_worker(registered):
    _, run, out, printed = registered
    experiment = run.info.experiment_id
    assert f"--default-artifact-root {out.parent / 'mlruns'} --workers 1" in printed
    runs_link = f"#/experiments/{experiment}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    assert runs_link in printed
    assert f"#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning" in printed


def test_the_experiment_carries_the_runs_table_view(registered):
    client, run, _, _ = registered
    tags = client.get_experiment(run.info.experiment_id).tags
    assert tags[f"mlflow.sharedViewState.{VIEW_KEY}"] == EXPERIMENT_TAGS[f"mlflow.sharedViewState.{VIEW_KEY}"]
    assert "metrics.`val/hIoU`" in runs_table_view()["selectedColumns"]


def test_pictures_are_stepped_mlflow_images(registered):
    client, run, _, _ = registered
    names = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    stepped = [n.removeprefix("images/").split("+") for n in names if n.endswith(".png")]  # key+step+N+...
    keys = {parts[0] for parts in stepped if parts[1] == "step"}  # MLflow writes a key's "/" as "~"
    assert keys >= {"val~prediction_0", "val~prediction_1", "val~confusion", "train~pseudo_labels_0"}, names
    steps = {parts[2] for parts in stepped if parts[0] == "val~prediction_0"}
    assert steps == {"2", "4"}  # one image per evaluation: MLflow's step slider


def test_the_logged_student_has_metrics_and_a_registered_alias(registered):
    client, run, out, printed = registered
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string="name = 'student'")
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["val/hIoU"] == pytest.approx(run.data.metrics["val/hIoU"])
    assert {"val/mIoU_U", "val/mIoU_S", "val/pAcc"} <= metrics.keys()
    version = client.get_model_version_by_alias("tiny-voc", out.name)
    assert version.run_id == run.info.run_id and model.model_id in version.source
    assert version.tags["val/hIoU"] == f"{run.data.metrics['val/hIoU']:.2f}"
    assert f"models:/tiny-voc@{out.name}" in printed
    assert run.data.tags["clipzss.registered_model"] == f"models:/tiny-voc@{out.name}"
