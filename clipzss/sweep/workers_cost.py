"""What a multi-worker trial costs: ``accelerate launch --num_processes 2`` against the same training as a 2-worker
trial of a one-trial search, and 2 one-worker trials against 1 two-worker trial for the same worker-steps.

Every run is a real ``train()`` of the search's first point on CPU (gloo), one thread per process. The pairs are
interleaved (launch, trial, launch, trial ...) so a load spike hits both sides; figures are medians over the repeats.
Ray Train's overhead per step is the trial's median ``train/sec_per_step`` over the launch's (what the step itself
pays: Ray's process group, its reporting); the wall-time ratio adds Ray's start, the trial's scheduling and the
checkpoint uploads.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clipzss.config import load_config
from clipzss.sweep.options import SweepOptions
from clipzss.sweep.search import run_search
from clipzss.sweep.shape import TrialShape
from clipzss.sweep.space import first_points, sample_overrides, search_space
from clipzss.train import prepare_data_root

ARCH, SCALES = "segformer_tiny", ("2,4", "2")
TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def _launch(config: str, overrides: list[str], folder: Path) -> tuple[float, float]:
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU; returns (wall s, median s per step)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_PY), config,
           *overrides, f"run.output_dir={folder / 'run'}", f"tracking.uri={uri}"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _median_step(uri, "")


def _search(config: str, overrides: list[str], folder: Path, samples: int, workers: int) -> tuple[float, float]:
    """A ``samples``-trial search of ``workers``-worker trials (1 CPU each) on a private Ray; returns (wall s, median
    s per step over its trials)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    opts = SweepOptions(config=config, overrides=[*overrides, f"tracking.uri={uri}"], archs=(ARCH,), scales=SCALES,
                        samples=samples, max_concurrent=samples, storage=str(folder / "ray"), name="cost",
                        shape=TrialShape(workers, cpus_per_worker=1.0, gpus_per_worker=0.0))  # fmt: skip
    start = time.perf_counter()
    run_search(opts)
    return time.perf_counter() - start, _median_step(uri, "run_trial")


def _median_step(uri: str, name_prefix: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(load_config("synthetic").tracking.experiment)
    values = [m.value for run in client.search_runs([experiment.experiment_id])
              if run.info.run_name.startswith(name_prefix) and "train/sec_per_step" in run.data.metrics
              for m in client.get_metric_history(run.info.run_id, "train/sec_per_step")]  # fmt: skip
    return statistics.median(values)


def measure_worker_cost(config: str, steps: int, repeats: int, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """Time the pairs interleaved ``repeats`` times; print and return the medians and ratios."""
    workdir = workdir.resolve()
    fixed = [f"optim.max_iters={steps}", "run.progress=false", "tracking.log_images=false", *overrides]
    base = load_config(config, fixed)
    prepare_data_root(base)  # once, outside every timing
    point = first_points(search_space(base, (ARCH,), SCALES), base, (ARCH,), SCALES)[0]
    trial_overrides = [*fixed, *sample_overrides(point)]
    times: dict[str, list[tuple[float, float]]] = {"launch": [], "trial2": [], "two_trials": []}
    for r in range(repeats):
        times["launch"].append(_launch(config, trial_overrides, workdir / f"launch_{r}"))
        times["trial2"].append(_search(config, fixed, workdir / f"trial2_{r}", samples=1, workers=2))
        times["two_trials"].append(_search(config, fixed, workdir / f"two_trials_{r}", samples=2, workers=1))
    wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    step = {k: statistics.median(s for _, s in v) for k, v in times.items()}
    figures = {
        **{f"{k}_wall_s": v for k, v in wall.items()},
        **{f"{k}_steps_per_s": 1 / v for k, v in step.items()},
        "ray_train_overhead_per_step": step["trial2"] / step["launch"] - 1,
        "ray_train_overhead_wall": wall["trial2"] / wall["launch"] - 1,
        "two_trials_over_one_2_worker_trial_wall": wall["two_trials"] / wall["trial2"],
    }
    _print(figures, steps, repeats)
    _log(figures, steps, repeats, workdir)
    return figures


def _print(f: dict[str, Any], steps: int, repeats: int) -> None:
    print(f"\n{steps} steps of {ARCH} per process, 1 CPU thread per process; medians of {repeats} interleaved repeats")
    print("| run | wall s | steps/s per process |\n|---|---|---|")
    for key, label in (("launch", "accelerate launch --num_processes 2"), ("trial2", "1 trial x 2 workers (Ray Train)"),
                       ("two_trials", "2 trials x 1 worker, at once")):  # fmt: skip
        print(f"| {label} | {f[f'{key}_wall_s']:.1f} | {f[f'{key}_steps_per_s']:.2f} |")
    print(
        f"Ray Train's overhead per step: {100 * f['ray_train_overhead_per_step']:+.1f}%; "
        f"wall (Ray start, scheduling, checkpoint uploads included): {100 * f['ray_train_overhead_wall']:+.1f}%"
    )
    print(f"2 one-worker trials take {f['two_trials_over_one_2_worker_trial_wall']:.2f}x the wall of 1 two-worker "
          "trial for the same worker-steps (the one trial also trains on a global batch twice as large)")  # fmt: skip


def _log(figures: dict[str, Any], steps: int, repeats: int, workdir: Path) -> None:
    """The figures as one MLflow run (``workers cost``) in the store beside the runs."""
    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{workdir / 'mlflow.db'}"), workdir / "summary", "workers cost")
    tracker.log_params({"steps": steps, "repeats": repeats, "arch": ARCH})
    tracker.log_metrics(figures, step=0)
    tracker.finish()
