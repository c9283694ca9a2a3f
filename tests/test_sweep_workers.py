"""Trials of several Ray Train workers, through the sweep scripts as a user runs them: a 2-worker trial on CPU (gloo)
equals ``accelerate launch --num_processes 2`` of the same config step by step, writes one MLflow run from rank 0,
and survives a worker killed with -9."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_fixtures import REPO, private_ray_env, ray_tmpdir
from tiny_run import tiny_overrides

pytest.importorskip("ray.train")

LOSS_PREFIX = "train/loss/"
FINAL = ("val/pAcc", "val/mIoU_S", "val/mIoU_U", "val/hIoU")


def _grid_args(assets, tmp_path: Path, name: str, **extra) -> list[str]:
    sets = [arg for item in tiny_overrides(assets, tmp_path / "unused", **extra) for arg in ("--set", item)]
    return ["--smoke", "--config", "voc", "--storage", str(tmp_path / "ray"), "--name", name, "--seeds", "1",
            "--archs", "segformer_tiny", "--scales", "2,4", "--workers-per-trial", "2", "--cpus-per-worker", "1",
            "--gpus-per-worker", "0", "--max-failures", "2", *sets]  # fmt: skip


def _env() -> dict[str, str]:
    env = private_ray_env(ray_tmpdir())
    # The same threads per process as the accelerate launch below (float sums depend on it); a loaded machine may
    # need more than Ray Train's default minute to start a worker group.
    env.update(OMP_NUM_THREADS="1", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="600")
    return env


def _trial_run(client, tmp_path: Path):
    """The one seed run of the grid's one cell (runs nest: parent -> cell -> trial)."""
    experiment = client.get_experiment_by_name("clipzss").experiment_id
    runs = client.search_runs([experiment], "tags.`mlflow.runName` LIKE 'run_trial%'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _losses(client, run) -> dict[str, dict[int, float]]:
    keys = [k for k in run.data.metrics if k.startswith(LOSS_PREFIX)]
    return {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in keys}


def _accelerate_launch(config_yaml: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "clipzss" / "train.py"), str(config_yaml), f"run.output_dir={out}",
           f"tracking.uri=sqlite:///{out.parent / 'direct.db'}", "tracking.parent_run_id=''",
           "tracking.run_name=direct"]  # fmt: skip
    return subprocess.run(cmd, env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_two_worker_trial_equals_accelerate_launch_with_two_processes(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    env = _env()
    done = subprocess.run([sys.executable, str(REPO / "sweeps" / "benchmark.py"), *_grid_args(assets, tmp_path, "w2")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    swept = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial = _trial_run(swept, tmp_path)
    assert trial.info.status == "FINISHED"
    params = trial.data.params
    assert (params["run.world_size"], params["data.per_process_batch"], params["data.global_batch"]) == ("2", "2", "4")
    (written,) = (tmp_path / "ray" / "w2").glob("*/config.yaml")  # by rank 0 in the trial's folder
    config_yaml = shutil.copy(written, tmp_path / "trial.yaml")  # Tune's folder names hold '=': not a CLI item

    direct = _accelerate_launch(config_yaml, tmp_path / "direct", env)
    assert direct.returncode == 0, direct.stderr[-4000:]
    launched = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'direct.db'}")
    (reference,) = launched.search_runs([launched.get_experiment_by_name("clipzss").experiment_id])
    assert reference.data.params["run.world_size"] == "2"

    ours, theirs = _losses(swept, trial), _losses(launched, reference)
    assert set(ours) == set(theirs) and LOSS_PREFIX + "total" in ours
    for key, by_step in theirs.items():
        assert sorted(ours[key]) == sorted(by_step) == [1, 2, 3, 4], key  # every step logged once
        for step, value in by_step.items():
            assert ours[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)
    for key in FINAL:
        assert trial.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-6), key
    # Rank 0 alone tracks: one run in the sweep's store beside the grid's parent and cell, none from rank 1.
    experiment = swept.get_experiment_by_name("clipzss").experiment_id
    assert len(swept.search_runs([experiment])) == 3


def _worker_pids(ray_tmp: str) -> list[int]:
    """PIDs of this sweep's Ray Train workers (Ray titles them after the actor class; the sweep's Ray is told apart
    from any other on the machine by its temp folder, in the workers' environment)."""
    found = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
    mine = []
    for pid in found:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if f"RAY_TMPDIR={ray_tmp}".encode() in environ:
            mine.append(int(pid))
    return sorted(mine)


def _assert_no_workers_left(ray_tmp: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _worker_pids(ray_tmp):
        assert time.monotonic() < deadline, "Ray Train workers outlived their trial"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_restarts_its_group_into_the_same_run(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    env = _env()
    args = _grid_args(assets, tmp_path, "kill", **{"optim.max_iters": 12, "run.eval_interval": 4,
                                                   "run.checkpoint_interval": 4})  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "benchmark.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        checkpoints = tmp_path / "ray" / "kill"
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("*/workers/checkpoint_*/step_*.pt")):  # the first checkpoint is in storage
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
            time.sleep(0.5)
        pids = _worker_pids(env["RAY_TMPDIR"])
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial = _trial_run(client, tmp_path)
    assert trial.info.status == "FINISHED"
    history = client.get_metric_history(trial.info.run_id, LOSS_PREFIX + "total")
    assert sorted(m.step for m in history) == list(range(1, 13))  # every step once, none twice
    _assert_no_workers_left(env["RAY_TMPDIR"])


STOP_AT_FIRST_RESULT = """
import sys
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from clipzss.sweep.shape import TrialShape
from clipzss.sweep.trainable import run_trial


class StopAtFirstResult(FIFOScheduler):  # what ASHA answers a trial below its rung's cut
    def on_trial_result(self, tune_controller, trial, result):
        return TrialScheduler.STOP


storage, parent, fixed = sys.argv[1], sys.argv[2], sys.argv[3:]
shape = TrialShape(2, cpus_per_worker=1.0, gpus_per_worker=0.0)
ray.init(address="local", num_cpus=3)
trainable = tune.with_resources(
    tune.with_parameters(run_trial, config="voc", fixed=fixed, parent_run_id=parent, shape=shape, max_failures=0),
    lambda sample: tune.PlacementGroupFactory([shape.resources(sample)]),
)
tune.Tuner(trainable, param_space={"student.arch": "segformer_tiny"},
           tune_config=tune.TuneConfig(scheduler=StopAtFirstResult()),
           run_config=tune.RunConfig(storage_path=storage, name="stop")).fit()
"""


@pytest.mark.slow
def test_a_scheduler_stop_ends_every_worker_and_closes_the_run_killed(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import Tracker
    from clipzss.train import STOPPED_EARLY_TAG

    env = _env()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(TrackingConfig(uri=uri), tmp_path / "parent", run_name="parent")
    fixed = tiny_overrides(assets, tmp_path / "unused", **{"optim.max_iters": 8, "tracking.uri": uri})
    command = [sys.executable, "-c", STOP_AT_FIRST_RESULT, str(tmp_path / "ray"), parent.run_id, *fixed]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    _assert_no_workers_left(env["RAY_TMPDIR"])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clipzss").experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.run_id}'")  # fmt: skip
    assert run.info.status == "KILLED" and run.data.tags[STOPPED_EARLY_TAG] == "stopped early at step 2"
    history = client.get_metric_history(run.info.run_id, LOSS_PREFIX + "total")
    assert sorted(m.step for m in history) == [1, 2]  # every rank stopped at the step Tune stopped


@pytest.mark.slow
def test_a_killed_driver_resumes_its_multi_worker_trial(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    env = _env()
    args = _grid_args(assets, tmp_path, "resume", **{"optim.max_iters": 8})
    script = [sys.executable, str(REPO / "sweeps" / "benchmark.py")]
    driver = subprocess.Popen([*script, *args], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "ray" / "resume").glob("*/workers/checkpoint_*/step_*.pt")):
            assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended before its first checkpoint"
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the private Ray it started
        driver.wait(timeout=60)
        _assert_no_workers_left(env["RAY_TMPDIR"])
        done = subprocess.run([*script, *args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial = _trial_run(client, tmp_path)  # the same run, continued
    assert trial.info.status == "FINISHED"
    history = client.get_metric_history(trial.info.run_id, LOSS_PREFIX + "total")
    assert sorted(m.step for m in history) == list(range(1, 9))
