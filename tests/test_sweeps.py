"""The Ray Tune + Optuna sweep end to end on CPU: 2 tiny real trials, MLflow parent with nested children."""

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from tiny_run import tiny_overrides

from clipzss.config import load_config

backbones = pytest.importorskip("sweeps.backbones")


def test_sampled_values_become_typed_overrides():
    sample = {"plm.kmeans.scales": "4,8,16", "optim.lr": 1.5e-05, "student.arch": "swin_tiny", "glm.weight": 0.0}
    cfg = load_config("voc", backbones.sample_overrides(sample))
    assert cfg.plm.kmeans.scales == (4, 8, 16) and cfg.optim.lr == 1.5e-05
    assert cfg.student.arch == "swin_tiny" and cfg.glm.weight == 0.0


@pytest.mark.parametrize(
    ("archs", "scales"), [(backbones.ARCHS, backbones.SCALES), (backbones.SMOKE_ARCHS, backbones.SMOKE_SCALES)]
)
def test_every_corner_of_the_search_space_is_a_valid_config(archs, scales):
    space = backbones.search_space(archs, scales)
    assert {"student.arch", "plm.kmeans.scales", "optim.lr", "plm.kmeans.fuse_threshold", "glm.weight"} <= set(space)
    corners = list(backbones.space_corners(space))
    assert len(corners) == len(archs) * len(scales) * 4 * 2**3  # glm.weight choices x 3 numeric ranges at 2 bounds
    assert backbones.check_space("synthetic", [], space) == len(corners)


def test_a_bad_search_value_names_its_key():
    with pytest.raises(Exception, match="student.arch.*no_such_net"):
        backbones.check_space("synthetic", [], backbones.search_space(("no_such_net",), ("8",)))
    with pytest.raises(Exception, match="plm.kmeans.scales"):
        backbones.check_space("synthetic", [], backbones.search_space(("segformer_b0",), ("4,x",)))


def test_smoke_sweep_two_trials_nested_in_mlflow(assets, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    sets = [arg for item in tiny_overrides(assets, tmp_path / "unused") for arg in ("--set", item)]
    opts = backbones.parse_args(["--smoke", "--config", "voc", "--storage", str(tmp_path / "ray"), "--name", "smoke",
                                 *sets])  # fmt: skip
    assert (opts.samples, opts.cpus_per_trial, opts.gpus_per_trial) == (2, 1.0, 0.0)
    start = time.perf_counter()
    summary = backbones.run_sweep(opts)
    print(f"smoke sweep: {time.perf_counter() - start:.1f} s")

    table = summary["table"]
    assert table["status"] == ["TERMINATED", "TERMINATED"]
    assert table["step"] == [4.0, 4.0] and all(0 <= v <= 100 for v in table["val/hIoU"])
    assert set(table["student.arch"]) <= set(backbones.SMOKE_ARCHS)
    keys = list(backbones.search_space())
    for row in range(2):  # what was sampled is a valid config
        load_config("voc", backbones.sample_overrides({k: table[k][row] for k in keys}))
    # every reported Ray checkpoint is a folder holding exactly one trainer checkpoint file
    checkpoints = sorted((tmp_path / "ray" / "smoke").glob("*/checkpoint_*"))
    assert len(checkpoints) == 4 and all([p.name for p in c.iterdir()] == [f"step_0000000{s}.pt"] for c, s in zip(
        checkpoints, [2, 4, 2, 4], strict=True))  # fmt: skip
    assert (tmp_path / "ray" / "smoke" / "best_config.yaml").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and f"best/{backbones.METRIC}" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all("val/hIoU" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "best_config.yaml"} <= artifacts
    shutil.rmtree(ray_tmp, ignore_errors=True)


class _FakeTune:
    """Stands in for Ray's trial session around ``run_trial`` (folder, name, restored checkpoint, report)."""

    def __init__(self, trial_dir: Path, restored=None, keep_to: Path | None = None, kill_after: int | None = None):
        self.trial_dir, self.restored, self.reports = trial_dir, restored, []
        self.keep_to, self.kill_after = keep_to, kill_after

    def get_trial_dir(self) -> str:
        return str(self.trial_dir)

    def get_trial_name(self) -> str:
        return "run_trial_00000"

    def report(self, metrics, checkpoint=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint else []
        self.reports.append((metrics["step"], files))
        if checkpoint and self.keep_to:  # what Ray's storage would hold after the report
            shutil.copytree(checkpoint.path, self.keep_to)
        if self.kill_after is not None and len(self.reports) >= self.kill_after:
            raise KeyboardInterrupt("node lost")


def test_restarted_trial_resumes_from_its_reported_checkpoint(assets, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray import tune

    from clipzss.engine.tracking import Tracker

    fixed = [*tiny_overrides(assets, tmp_path / "unused"), "tracking.log_images=false"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(load_config(None, fixed).tracking, tmp_path / "parent", run_name="sweep")
    sample = {"student.arch": "segformer_tiny", "plm.kmeans.scales": "2,4", "optim.lr": 1e-3}

    first = _FakeTune(tmp_path / "node_a", keep_to=tmp_path / "reported", kill_after=1)
    monkeypatch.setattr(tune, "get_context", lambda: first)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: first.restored)
    monkeypatch.setattr(tune, "report", first.report)
    with pytest.raises(KeyboardInterrupt):
        backbones.run_trial(sample, None, fixed, parent.run_id)
    assert first.reports == [(2, ["step_00000002.pt"])]  # the checkpoint folder holds only that file

    # Ray restarts the trial on another node: a fresh folder, the last reported checkpoint handed back
    second = _FakeTune(tmp_path / "node_b", restored=tune.Checkpoint.from_directory(tmp_path / "reported"))
    monkeypatch.setattr(tune, "get_context", lambda: second)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: second.restored)
    monkeypatch.setattr(tune, "report", second.report)
    backbones.run_trial(sample, None, fixed, parent.run_id)
    assert second.reports == [(4, ["step_00000004.pt"])]  # continued from step 2, not from scratch
    assert sorted(p.name for p in (tmp_path / "node_b" / "checkpoints").iterdir()) == [
        "step_00000002.pt",
        "step_00000004.pt",
    ]
    children = MlflowClient(tracking_uri=uri).search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # the same MLflow run, continued
