"""Loading a model from MLflow never unpickles it: a registered version whose pickle writes a file on load is refused
by the real ``clipzss segment --model models:/...`` (the file is never written), and a logged student is weights
and a config, loaded by building the architecture from clipzss's code."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from clipzss.cli import main as cli
from clipzss.config import from_dict, load_config
from clipzss.engine.checkpoint import load_model_bundle
from clipzss.engine.segmenter import OpenVocabSegmenter
from clipzss.engine.tracking import Tracker, current_store
from clipzss.models.students import build_student

CLIPZSS = str(Path(sys.executable).with_name("clipzss"))  # the installed console command


class WritesOnLoad(torch.nn.Module):
    """A module whose pickle, when loaded, writes ``marker`` (any code could run there instead)."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran at model load')",)


def _register(store: str, name: str, model_uri: str, run_id: str, model_id: str) -> str:
    """Version 1 of a new registered model ``name``; returns ``models:/<name>/1``."""
    with current_store(store):  # the registry resolves the logged model in MLflow's current store
        MlflowClient(store).create_registered_model(name)
        MlflowClient(store).create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    return f"models:/{name}/1"


def _pickled_version(store: str, name: str, module: torch.nn.Module, bundle: dict) -> str:
    """Log ``module`` the ``mlflow.pytorch`` pickle way, with a plausible clipzss metadata, as version 1 of
    ``name``; returns ``models:/<name>/1``."""
    import mlflow.pytorch

    metadata = {"clipzss_config": bundle["config"], "alpha": float(bundle["alpha"]), "embed_dim": bundle["embed_dim"]}
    with current_store(store), mlflow.start_run():
        info = mlflow.pytorch.log_model(
            module, name="student", metadata=metadata, serialization_format="pickle", pip_requirements=["torch"]
        )
    return _register(store, name, info.model_uri, info.run_id, info.model_id)


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory):
    """A SQLite store with a clipzss-logged student (``models:/safe/1``), a version whose pickle writes a marker
    (``models:/evil/1``) and an honest student logged the old pickled way (``models:/old/1``)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    bundle = load_model_bundle(trained_run / "model.pt")
    tracker = Tracker(load_config(None, [f"tracking.uri={uri}"]).tracking, root / "run", run_name="safe")
    tracker.log_student(trained_run / "model.pt")
    tracker.finish()
    client = MlflowClient(uri)
    (model,) = client.search_logged_models([client.get_run(tracker.run_id).info.experiment_id])
    safe = _register(uri, "safe", model.model_uri, tracker.run_id, model.model_id)
    marker = root / "pwned.txt"
    evil = _pickled_version(uri, "evil", WritesOnLoad(marker), bundle)
    student = build_student(from_dict(bundle["config"]).student, bundle["embed_dim"])
    student.load_state_dict(bundle["student"])
    old = _pickled_version(uri, "old", student.eval(), bundle)
    image = root / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    return {"uri": uri, "safe": safe, "evil": evil, "old": old, "marker": marker, "image": image, "root": root,
            "bundle": bundle}  # fmt: skip


def _clipzss(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CLIPZSS_DEBUG", None)
    return subprocess.run([CLIPZSS, *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_payload_is_live_when_mlflow_unpickles_it(store):
    """The test's attack works: MLflow's own pickle loader runs it (so its absence below means something)."""
    marker = store["marker"].with_name("direct.txt")
    code = "import sys, mlflow.pytorch\nmlflow.set_tracking_uri(sys.argv[1])\nmlflow.pytorch.load_model(sys.argv[2])"
    victim = store["root"] / "victim.py"
    victim.write_text(code)
    evil = _pickled_version(store["uri"], "evil-direct", WritesOnLoad(marker), store["bundle"])
    subprocess.run([sys.executable, str(victim), store["uri"], evil], capture_output=True, timeout=300)
    assert marker.read_text() == "code ran at model load"


def test_segment_refuses_a_pickled_version_and_never_runs_its_code(store, tmp_path):
    done = _clipzss("segment", str(store["image"]), "--model", store["evil"], "--tracking-uri", store["uri"],
                    "--classes", "cat,sky", "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 1 and not store["marker"].exists()
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: models:/evil/1 is a pickled PyTorch module")
    assert "--trust-pickle" in lines[-1] and "--checkpoint" in lines[-1]
    assert not list(tmp_path.iterdir())


def test_eval_and_export_refuse_it_too(store, tmp_path, capsys):
    source = ["--model", store["evil"], "--tracking-uri", store["uri"]]
    assert cli(["eval", *source]) == 1
    assert cli(["export", *source, "--classes", "cat", "--out", str(tmp_path / "onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("error: models:/evil/1 is a pickled PyTorch module") == 2, err
    assert not store["marker"].exists() and not (tmp_path / "onnx").exists()


def test_an_old_pickled_student_loads_only_with_the_explicit_opt_in(store, tmp_path, capsys):
    args = ["segment", str(store["image"]), "--model", store["old"], "--tracking-uri", store["uri"], "--classes", "cat"]
    assert cli([*args, "--out", str(tmp_path / "a")]) == 1
    assert "error: models:/old/1 is a pickled PyTorch module" in capsys.readouterr().err
    assert cli([*args, "--out", str(tmp_path / "b"), "--trust-pickle"]) == 0
    assert (tmp_path / "b" / "scene_seg.png").exists() and not (tmp_path / "a").exists()


def test_a_clipzss_model_segments_evaluates_and_exports_as_its_checkpoint(store, trained_run, tmp_path, capsys):
    args = ["segment", str(store["image"]), "--classes", "cat,sky,grass"]
    source = ["--model", store["safe"], "--tracking-uri", store["uri"]]
    assert cli([*args, *source, "--out", str(tmp_path / "m")]) == 0
    assert cli([*args, "--checkpoint", str(trained_run / "model.pt"), "--out", str(tmp_path / "c")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "scene_seg.png")) for d in ("m", "c"))
    assert np.array_equal(a, b)
    capsys.readouterr()
    assert cli(["eval", *source, "--cpu"]) == 0
    by_model = capsys.readouterr().out
    assert cli(["eval", "--checkpoint", str(trained_run / "model.pt"), "--cpu"]) == 0
    assert "hIoU" in by_model and by_model == capsys.readouterr().out
    assert mlflow.get_tracking_uri() != store["uri"]  # the command left MLflow's current store as it was
    assert cli(["export", *source, "--classes", "cat,sky", "--out", str(tmp_path / "onnx")]) == 0
    spec = json.loads((tmp_path / "onnx" / "deploy.json").read_text())
    assert spec["classes"] == ["cat", "sky"] and spec["student"] == "segformer_tiny"
    assert spec["alpha"] == OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt").alpha


def test_the_logged_student_is_weights_and_config_without_mlflow_pickle_warnings(trained_run, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(load_config(None, [f"tracking.uri={uri}"]).tracking, tmp_path / "run", run_name="files")
    with caplog.at_level(logging.WARNING):
        model_uri = tracker.log_student(trained_run / "model.pt")
    assert not [r for r in caplog.records if "ickle" in r.getMessage()]
    client = MlflowClient(uri)
    (model,) = client.search_logged_models([client.get_run(tracker.run_id).info.experiment_id])
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path)))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == ["MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "student/clipzss.json",
                     "student/weights.safetensors"]  # fmt: skip
    assert model_uri == f"runs:/{tracker.run_id}/student"
