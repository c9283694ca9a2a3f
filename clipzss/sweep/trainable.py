"""The Tune function trainable: one real ``train()`` per trial, in the trial's own folder and MLflow child run.

Two hazards of Ray 2.60 are handled here, where a trial starts (a trial that the scheduler (ASHA) stops, with
``SystemExit(0)`` raised inside ``tune.report``, is closed KILLED and tagged with its step by ``train()`` itself):

- A restarted trial (worker lost, or the sweep resumed after its driver died) is handed the checkpoint named in
  the last experiment snapshot, which can lag what was written; it resumes from the highest step found in the
  trial's storage instead, so no step is trained (or logged) twice.
- A restarted trial runs in a fresh folder: it finds its MLflow run again by parent and run name, so each trial has
  exactly one child run however often it restarts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from clipzss.config import Config, load_config, set_value
from clipzss.engine.checkpoint import CHECKPOINT_DIR, MODEL_FILE, latest_checkpoint
from clipzss.engine.tracking import RUN_ID_FILE
from clipzss.sweep.shape import TrialShape
from clipzss.sweep.space import sample_overrides

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
STOP_GRACE_SECONDS = 300.0  # the longest a stopped trial waits for its run to close


def report_checkpoint_file(report, checkpoint_cls, metrics: dict[str, float], checkpoint: Path | None) -> None:
    """Call Ray's ``report`` (Tune's or Train's) with ``metrics`` and, if any, the checkpoint file as a folder holding
    only that one file (``checkpoint_cls``: the matching ``Checkpoint``); Ray copies it to storage before returning."""
    if checkpoint is None:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy2(checkpoint, folder)
        report(metrics, checkpoint=checkpoint_cls.from_directory(folder))


def _tune_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
    from ray import tune

    report_checkpoint_file(tune.report, tune.Checkpoint, metrics, checkpoint)


def restore_latest_checkpoint(output_dir: Path) -> Path | None:
    """Copy the highest-step checkpoint this trial ever reported (from its storage, local or s3://) into
    ``<output_dir>/checkpoints``; returns the local file, or None for a first start."""
    from ray import tune

    storage = tune.get_context().get_storage()
    return fetch_latest_checkpoint(storage.storage_filesystem, storage.trial_fs_path, output_dir)


def fetch_latest_checkpoint(fs, root: str, output_dir: Path) -> Path | None:
    """The highest-step ``step_<N>.pt`` in any ``checkpoint_*`` folder under ``root`` (a pyarrow filesystem path),
    copied into ``<output_dir>/checkpoints`` unless already there; None when there is none."""
    from pyarrow.fs import FileSelector, FileType, copy_files

    found = []
    for info in fs.get_file_info(FileSelector(root, allow_not_found=True, recursive=True)):
        parent = Path(info.path).parent.name
        if info.type == FileType.File and parent.startswith("checkpoint_") and (m := _STEP_FILE.search(info.path)):
            found.append((int(m.group(1)), info.path))
    if not found:
        return None
    step, path = max(found)
    target = output_dir / CHECKPOINT_DIR / Path(path).name
    if latest_checkpoint(output_dir) != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")  # workers of one node may fetch at once
        copy_files(path, str(partial), source_filesystem=fs)
        os.replace(partial, target)
    return target


def reattach_mlflow_run(cfg: Config, output_dir: Path, resumable: bool) -> None:
    """A restarted trial keeps exactly one MLflow run (found by parent and run name): with a checkpoint to resume
    (``resumable``) it continues that run (also from a fresh folder on another node); with none, ``train()`` starts
    a new run, so the earlier runs of this trial (no checkpointed progress) are deleted, tagged why (MLflow keeps
    them in its trash)."""
    from mlflow.tracking import MlflowClient

    if not cfg.tracking.enabled or not cfg.tracking.parent_run_id:
        return
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return
    t = cfg.tracking
    query = f"tags.mlflow.parentRunId = '{t.parent_run_id}' and tags.`mlflow.runName` = '{t.run_name}'"
    runs = client.search_runs([experiment.experiment_id], query)
    id_file = output_dir / RUN_ID_FILE
    if not resumable:
        for run in runs:
            client.set_tag(run.info.run_id, "clipzss.stopped", "its trial restarted from scratch in a new run")
            client.delete_run(run.info.run_id)
    elif runs and not id_file.exists():
        id_file.write_text(runs[0].info.run_id)


def trial_config(sample: dict[str, Any], config: str | None, fixed: list[str], parent_run_id: str) -> Config:
    """The trial's config: base + fixed overrides + ``sample``, in the trial's folder, nested under the parent."""
    from ray import tune

    context = tune.get_context()
    cfg = load_config(config, [*fixed, *sample_overrides(sample)])
    set_value(cfg, "run.output_dir", str(Path(context.get_trial_dir()).resolve()))
    if cfg.tracking.enabled and parent_run_id:
        set_value(cfg, "tracking.parent_run_id", parent_run_id)
        set_value(cfg, "tracking.run_name", context.get_trial_name())
    return cfg


def run_trial(
    sample: dict[str, Any],
    config: str | None,
    fixed: list[str],
    parent_run_id: str,
    cell_runs: dict[str, str] | None = None,
    measure_cost: bool = False,
    shape: TrialShape | None = None,
    max_failures: int = 1,
) -> None:
    """One real ``train()`` on the base config + fixed overrides + ``sample`` (Tune's function trainable).

    Args:
        sample: the sampled (or grid) values of the search-space keys.
        config: the base preset or YAML file; ``fixed``: overrides every trial shares.
        parent_run_id: the sweep's MLflow run this trial's run is nested under ...
        cell_runs: ... or, for a benchmark grid, the run of each cell ``"<arch>/<scales>"`` (see :func:`cell_key`).
        measure_cost: the last report also carries the student's ``cost/...`` figures (:mod:`clipzss.sweep.cost`).
        shape: the trial's workers and resources (:class:`TrialShape`); several workers run ``train()`` through
            Ray Train (:mod:`clipzss.sweep.workers`), Ray Train restarting them ``max_failures`` times.
    """
    from clipzss.train import train

    cfg = trial_config(sample, config, fixed, cell_runs[cell_key(sample)] if cell_runs else parent_run_id)
    shape = shape or TrialShape()
    if shape.workers(sample) > 1:
        from clipzss.sweep.workers import run_worker_trial

        run_worker_trial(cfg, shape.workers(sample), shape, max_failures, measure_cost)
        return
    output_dir = Path(cfg.run.output_dir)
    restore_latest_checkpoint(output_dir)
    resumable = latest_checkpoint(output_dir) is not None  # decided once: the MLflow run and train() agree
    reattach_mlflow_run(cfg, output_dir, resumable)

    final: list[tuple[dict[str, float], Path | None]] = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        # The last evaluation is held back until train() returns: ASHA answers a result at max_t with STOP, which
        # would end the trial before it exports model.pt and closes its MLflow run.
        if metrics["step"] >= cfg.optim.max_iters:
            final.append((metrics, checkpoint))
        else:
            _tune_report(metrics, checkpoint)

    # The folder is this trial's own: continue whatever it holds (never a sibling folder, never a second run); a
    # retry after the final checkpoint (the trial failed later, e.g. in its cost figures) re-reports its result.
    train(cfg, report=report, resume=resumable, complete=True)
    for metrics, checkpoint in final:
        if measure_cost:
            from clipzss.sweep.cost import student_cost

            metrics = {**metrics, **student_cost(output_dir / MODEL_FILE, trial_device(cfg))}
        _tune_report(metrics, checkpoint)


class FinishesItsRunOnStop:
    """A mixin of the trial's Tune trainable: when the scheduler stops the trial, its process stays until the trial's
    thread has closed the MLflow run (KILLED, tagged with its step; for a multi-worker trial, after every rank has
    stopped). Tune ends a stopped trial's process as soon as this cleanup returns, cutting any of that short."""

    def cleanup(self) -> None:
        from ray.train._internal.session import get_session

        session = get_session()
        thread = session.training_thread if session is not None and session.training_started else None
        try:
            super().cleanup()  # wakes the trial's thread with the scheduler's SystemExit
        finally:
            if thread is not None:
                thread.join(STOP_GRACE_SECONDS)


run_trial.__mixins__ = (FinishesItsRunOnStop,)  # Tune builds the trainable class from it (ray.tune.with_parameters)


def cell_key(sample: dict[str, Any]) -> str:
    """The benchmark cell a sample belongs to: ``"<student.arch>/<plm.kmeans.scales>"``."""
    return f"{sample['student.arch']}/{sample['plm.kmeans.scales']}"


def trial_device(cfg: Config) -> str:
    """Where the trial's student is measured: its GPU when it trained on one, else the CPU."""
    import torch

    return "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
