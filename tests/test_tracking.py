"""What an MLflow user finds after one real (tiny) training run: the run, its model, its inputs, its pictures."""

import subprocess

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny_run import REPO, assert_loads_as_student, tiny_overrides

from clipzss.cli import main as cli
from clipzss.config import load_config
from clipzss.data.splits import load_split
from clipzss.engine.mlflow_flavor import load_student
from clipzss.engine.segmenter import SYNTHETIC_TEACHER, OpenVocabSegmenter
from clipzss.engine.tracking import Tracker, param_value, rounded
from clipzss.train import train

VOC_CLASSES = load_split("voc", "default").classes


@pytest.fixture(scope="module")
def tracked(assets, tmp_path_factory):
    """A tiny tracked run (evaluations at steps 2 and 4, system metrics on): (client, run, output folder)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg = load_config(None, tiny_overrides(assets, out, **{"tracking.system_metrics": "true"}))
    with pytest.MonkeyPatch.context() as mp:  # sample every 0.5 s (MLflow's default is 10 s): a tiny run is short
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        train(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    return client, client.get_run((out / "mlflow_run_id").read_text().strip()), out


def test_param_values_read_as_typed_and_metrics_are_rounded():
    assert param_value((4, 8, 16)) == "[4, 8, 16]" and param_value([]) == "[]"
    assert param_value(True) == "true" and param_value(None) == "null" and param_value(1e-4) == "0.0001"
    assert rounded(35.412371) == 35.412 and rounded(0.000123456) == 0.00012346


def test_the_experiment_opens_as_model_training_and_the_run_says_what_it_is(tracked):
    client, run, _ = tracked
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "segformer_tiny voc scales=[2, 4] seed=0"
    assert "`segformer_tiny`" in run.data.tags["mlflow.note.content"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.params["plm.kmeans.scales"] == "[2, 4]" and run.data.params["plm.enabled"] == "true"
    inputs = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {("voc/default", "train"), ("voc/default", "eval")}


def test_every_evaluation_logs_summary_and_per_class_iou_without_a_step_metric(tracked):
    client, run, _ = tracked
    metrics = run.data.metrics
    assert "step" not in metrics
    per_class = sorted(k for k in metrics if k.startswith("val/IoU/"))  # classes absent from val have no IoU
    assert per_class and {k.split("/")[-1] for k in per_class} <= set(VOC_CLASSES)
    steps = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in metrics}
    assert steps["val/hIoU"] == steps["val/mIoU_S"] == [2, 4]
    assert any(steps[key] == [2, 4] for key in per_class), {k: steps[k] for k in per_class}
    assert all(v == rounded(v) for k, v in metrics.items() if not k.startswith("system/"))  # MLflow logs those
    assert any(k.startswith("system/") for k in metrics)  # tracking.system_metrics=true


def test_the_student_is_an_mlflow_model_that_segment_loads(tracked, tmp_path, capsys, monkeypatch):
    client, run, out = tracked
    uri = f"runs:/{run.info.run_id}/student"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # restored after the test (later subprocesses)
    mlflow.set_tracking_uri(client.tracking_uri)
    info = mlflow.models.get_model_info(uri)
    assert info.flavors.keys() == {"clipzss", "python_function"}  # weights + config; no pickled pytorch flavour
    assert info.flavors["python_function"]["loader_module"] == "clipzss.engine.mlflow_flavor"
    assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert_loads_as_student(uri, client.tracking_uri)  # in a user's fresh process too
    student = load_student(uri).student
    reference = OpenVocabSegmenter.from_checkpoint(out / "model.pt")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(student(images), reference.student(images), atol=1e-6)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    classes = ["--classes", "aeroplane,bicycle,person"]
    assert cli(["segment", str(photo), "--model", uri, "--tracking-uri", client.tracking_uri,
                "--out", str(tmp_path / "a")] + classes) == 0  # fmt: skip
    checkpoint = ["--checkpoint", str(out / "model.pt")]
    assert cli(["segment", str(photo), *checkpoint, "--out", str(tmp_path / "b")] + classes) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "photo_seg.png")) for d in ("a", "b"))
    assert np.array_equal(a, b)
    assert "warning" not in capsys.readouterr().err  # a real CLIP-style teacher: any word goes


def test_segment_warns_which_names_a_small_teacher_knows(tracked, capsys):
    _, _, out = tracked
    segmenter = OpenVocabSegmenter.from_checkpoint(out / "model.pt")
    segmenter.cfg.teacher.model = SYNTHETIC_TEACHER  # as in a student of the synthetic world
    segmenter.set_vocabulary(["red striped", "cat"])
    err = capsys.readouterr().err
    assert "'cat'" in err and "red striped, red dotted" in err and "'red striped'" not in err


def test_table_columns_lose_their_dots_which_the_ui_shows_blank(tmp_path, monkeypatch):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker(cfg.tracking, tmp_path / "run", run_name="table")
    tracker.log_table({"optim.lr": [0.1], "val/hIoU": [12.345678]}, "trials.json")
    with pytest.raises(ValueError, match="collide"):
        tracker.log_table({"optim.lr": [0.1], "optim/lr": [0.2]}, "bad.json")
    tracker.finish()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # restored after the test (later subprocesses)
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_experiment("clipzss")
    table = mlflow.load_table("trials.json", run_ids=[tracker.run_id])
    assert list(table.columns) == ["optim/lr", "val/hIoU"] and table["val/hIoU"][0] == 12.346


def _open_store(uri: str, folder: str) -> str:
    return Tracker(load_config(None, [f"tracking.uri={uri}"]).tracking, folder, run_name="concurrent").run_id


def test_processes_opening_a_new_sqlite_store_at_once_all_get_their_run(tmp_path):
    """MLflow builds a new SQLite file's schema on first use; processes doing that at once race
    ("duplicate column name: step") unless they wait on the lock beside it, as the two direct runs of sweeps/overhead.py
    do."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        ids = list(pool.map(_open_store, [uri] * 4, [str(tmp_path / f"run{i}") for i in range(4)]))
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name = 'clipzss'")
    assert len(set(ids)) == 4 and len(client.search_runs([experiment.experiment_id])) == 4
