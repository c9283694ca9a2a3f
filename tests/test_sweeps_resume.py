"""A smoke sweep next to a running local ``ray start`` cluster, its driver killed (-9) mid-sweep and resumed: one
child run per trial, each step logged once, every run's state true, the parent FINISHED and marked resumed."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_fixtures import REPO, private_ray_env, ray_tmpdir, run_script
from tiny_run import tiny_overrides

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _ray_status(ray_bin: str, port: int, env: dict[str, str]) -> str:
    """``ray status`` of the test's cluster ("" while it does not answer yet)."""
    done = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return done.stdout if done.returncode == 0 else ""


def _poll(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"sweep ended before the kill: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the kill moment never came"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["first_run_opened", "first_checkpoint"])
def test_smoke_sweep_killed_and_resumed_next_to_a_running_cluster(assets, tmp_path, moment):
    import shutil

    from mlflow.tracking import MlflowClient

    ray_tmp = ray_tmpdir()
    env = private_ray_env(ray_tmp)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    cluster = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                f"--temp-dir={ray_tmp}/ray"], env=env, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # the cluster a bare `ray.init()` would join: ready once `ray status` answers
        _poll(lambda: cluster.poll() is not None or _ray_status(ray_bin, port, env), "ray start")
        assert cluster.poll() is None, "ray start failed"
        sets = [arg for item in tiny_overrides(assets, tmp_path / "unused", **{"optim.max_iters": 6})
                for arg in ("--set", item)]  # fmt: skip
        args = ["--smoke", "--config", "voc", "--storage", str(tmp_path / "ray"), "--name", "k", *sets]
        db = tmp_path / "mlflow.db"
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        experiment = lambda: client.get_experiment_by_name("clipzss")  # noqa: E731
        if moment == "first_run_opened":
            ready = lambda: db.exists() and experiment() and len(client.search_runs([experiment().experiment_id])) > 1  # noqa: E731
        else:
            ready = lambda: any((tmp_path / "ray" / "k").glob("*/checkpoint_000000/step_*.pt"))  # noqa: E731
        log = tmp_path / "driver.log"
        with log.open("w") as out:
            command = [sys.executable, str(REPO / "sweeps" / "backbones.py"), *args]
            driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=out,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        _wait_for(ready, driver, log)
        _kill_group(driver)
        driver.wait(timeout=60)
        # the cluster frees the killed driver's trial (its one CPU) before the resumed driver asks for it
        _poll(lambda: " 0.0/1.0 CPU" in _ray_status(ray_bin, port, env), "the killed driver's trial released")
        done = run_script("backbones.py", [*args, "--resume"], tmp_path, env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        _kill_group(cluster, signal.SIGTERM)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    (parent,) = client.search_runs([experiment().experiment_id], "tags.`mlflow.runName` = 'backbones k'")
    assert parent.info.status == "FINISHED" and "clipzss.resumed" in parent.data.tags
    children = client.search_runs([experiment().experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = list((tmp_path / "ray" / "k").glob("run_trial_*"))
    assert len(children) == len(trials) == 2  # one child run per trial
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        for key in ("val/hIoU", "train/loss/total"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)) and max(steps) == 6  # each step once, trained to the end
