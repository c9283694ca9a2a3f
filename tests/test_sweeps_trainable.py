"""The Tune trainable around real tiny ``train()`` runs, under a stand-in for Ray's trial session: restarts resume
from the latest checkpoint in storage into the same MLflow run, and an ASHA stop ends the run KILLED, tagged."""

import shutil
from pathlib import Path

import pytest
from tiny_run import tiny_overrides

from clipzss.config import load_config
from clipzss.engine.tracking import Tracker
from clipzss.train import STOPPED_EARLY_TAG

tune = pytest.importorskip("ray.tune")
from clipzss.sweep import trainable  # noqa: E402

SAMPLE = {"student.arch": "segformer_tiny", "plm.kmeans.scales": "2,4", "optim.lr": 1e-3}


class _Storage:
    def __init__(self, trial_fs_path: Path):
        from pyarrow.fs import LocalFileSystem

        self.storage_filesystem, self.trial_fs_path = LocalFileSystem(), str(trial_fs_path)


class _FakeTune:
    """Ray's trial session around ``run_trial``: folder, name, storage, and ``report``, which persists a checkpoint
    to ``checkpoint_<index>`` in the trial's storage as Ray does; ``stop_after`` reports raise what Ray raises."""

    def __init__(self, trial_dir: Path, storage: Path, first_index: int = 0, stop_after=None, stop=KeyboardInterrupt):
        self.trial_dir, self.storage, self.index, self.reports = trial_dir, storage, first_index, []
        self.stop_after, self.stop = stop_after, stop

    def get_trial_dir(self) -> str:
        return str(self.trial_dir)

    def get_trial_name(self) -> str:
        return "run_trial_00000"

    def get_storage(self):
        return _Storage(self.storage)

    def report(self, metrics, checkpoint=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint else []
        self.reports.append((metrics["step"], files))
        if checkpoint:
            shutil.copytree(checkpoint.path, self.storage / f"checkpoint_{self.index:06d}", dirs_exist_ok=True)
            self.index += 1
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise self.stop()


def _session(monkeypatch, fake: _FakeTune) -> _FakeTune:
    monkeypatch.setattr(tune, "get_context", lambda: fake)
    monkeypatch.setattr(tune, "report", fake.report)
    return fake


def _setup(assets, tmp_path, **extra):
    fixed = [*tiny_overrides(assets, tmp_path / "unused", **extra), "tracking.log_images=false"]
    parent = Tracker(load_config(None, fixed).tracking, tmp_path / "parent", run_name="sweep")
    children = lambda: parent.client.search_runs(  # noqa: E731
        [parent.client.get_run(parent.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    return fixed, parent, children


def test_restarted_trial_resumes_from_the_latest_checkpoint_into_its_run(assets, tmp_path, monkeypatch):
    fixed, parent, children = _setup(assets, tmp_path, **{"optim.max_iters": 6})
    storage = tmp_path / "storage"
    storage.mkdir()
    first = _session(monkeypatch, _FakeTune(tmp_path / "node_a", storage, stop_after=2))
    with pytest.raises(KeyboardInterrupt):  # the node is lost right after the step-4 report
        trainable.run_trial(SAMPLE, None, fixed, parent.run_id)
    assert first.reports == [(2, ["step_00000002.pt"]), (4, ["step_00000004.pt"])]  # one file per checkpoint

    # Ray restarts it in a fresh folder on another node; the driver's snapshot may name checkpoint_000000, but the
    # trial's storage holds checkpoint_000001 (step 4): training continues from there
    second = _session(monkeypatch, _FakeTune(tmp_path / "node_b", storage, first_index=1))
    trainable.run_trial(SAMPLE, None, fixed, parent.run_id)
    assert second.reports == [(6, ["step_00000006.pt"])]
    assert sorted(p.name for p in (tmp_path / "node_b" / "checkpoints").iterdir()) == [
        "step_00000004.pt",
        "step_00000006.pt",
    ]
    (child,) = children()  # the same MLflow run, continued
    assert child.info.status == "FINISHED"
    for key in ("val/hIoU", "train/loss/total"):
        steps = [m.step for m in parent.client.get_metric_history(child.info.run_id, key)]
        assert len(steps) == len(set(steps))  # every step logged once
    assert sorted(m.step for m in parent.client.get_metric_history(child.info.run_id, "val/hIoU")) == [2, 4, 6]


def test_a_trial_restarted_before_any_checkpoint_keeps_its_one_run(assets, tmp_path, monkeypatch):
    fixed, parent, children = _setup(assets, tmp_path)
    storage = tmp_path / "storage"
    storage.mkdir()
    Tracker(  # the first attempt opened its run, then its node vanished before any report
        load_config(None, [*fixed, f"tracking.parent_run_id={parent.run_id}", "tracking.run_name=run_trial_00000"]
                    ).tracking, tmp_path / "node_a", tags={"mlflow.parentRunId": parent.run_id})  # fmt: skip
    _session(monkeypatch, _FakeTune(tmp_path / "node_b", storage))
    trainable.run_trial(SAMPLE, None, fixed, parent.run_id)
    (child,) = children()
    assert child.info.status == "FINISHED" and child.info.run_name == "run_trial_00000"


def test_a_trial_asha_stops_ends_killed_with_its_step_and_metrics(assets, tmp_path, monkeypatch):
    fixed, parent, children = _setup(assets, tmp_path, **{"optim.max_iters": 6})
    storage = tmp_path / "storage"
    storage.mkdir()
    _session(monkeypatch, _FakeTune(tmp_path / "trial", storage, stop_after=1, stop=lambda: SystemExit(0)))
    with pytest.raises(SystemExit):  # what Ray 2.60 raises inside tune.report for a trial its scheduler stops
        trainable.run_trial(SAMPLE, None, fixed, parent.run_id)
    (child,) = children()
    assert child.info.status == "KILLED" and child.data.tags[STOPPED_EARLY_TAG] == "stopped early at step 2"
    assert "val/hIoU" in child.data.metrics  # its metrics so far are kept (the step is in the tag)


def test_a_trial_retried_after_its_final_checkpoint_reports_its_result_again(assets, tmp_path, monkeypatch):
    fixed, parent, children = _setup(assets, tmp_path, **{"optim.max_iters": 4})
    storage = tmp_path / "storage"
    storage.mkdir()
    from clipzss.sweep import cost

    def broken(*_):
        raise RuntimeError("cost figures failed")  # as a broken import in the cost code would

    monkeypatch.setattr(cost, "student_cost", broken)
    first = _session(monkeypatch, _FakeTune(tmp_path / "trial", storage))
    with pytest.raises(RuntimeError, match="cost figures failed"):
        trainable.run_trial(SAMPLE, None, fixed, parent.run_id, measure_cost=True)
    assert [step for step, _ in first.reports] == [2]  # the final result never reached Tune

    # Ray retries the trial in the same folder, which holds the final checkpoint (step 4): no training, no refusal;
    # the final checkpoint is evaluated again and reported with its cost figures
    monkeypatch.setattr(cost, "student_cost", lambda *_: {"cost/params_M": 1.0})
    second = _session(monkeypatch, _FakeTune(tmp_path / "trial", storage, first_index=first.index))
    trainable.run_trial(SAMPLE, None, fixed, parent.run_id, measure_cost=True)
    assert second.reports == [(4, ["step_00000004.pt"])]
    (child,) = children()
    assert child.info.status == "FINISHED"
    assert [m.step for m in parent.client.get_metric_history(child.info.run_id, "val/hIoU")] == [2, 4]  # once each
    experiment = child.info.experiment_id
    models = parent.client.search_logged_models([experiment], f"source_run_id = '{child.info.run_id}'")
    assert [m.name for m in models] == ["student"]  # finished twice, logged once
