"""The trainer under faults, races and bad values, each through the real entry point.

Tracking status and history are read back from the MLflow store the run wrote to.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml
from tiny_run import REPO, tiny_overrides

from clipzss.cli import main as cli_main
from clipzss.config import ConfigError, load_config
from clipzss.engine import spool
from clipzss.engine.checkpoint import latest_checkpoint, load_checkpoint
from clipzss.engine.run_lock import RunDirBusyError, run_dir_lock
from clipzss.train import STOPPED_EARLY_TAG, ResumeError, train
from clipzss.train import main as train_main

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def mlflow_run(out: Path):
    """(status, {metric: [steps]}, params, tags) of the MLflow run of ``out``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    return run.info.status, steps, run.data.params, run.data.tags


def test_a_busy_run_dir_is_refused_naming_its_holder(assets, tmp_path):
    out = tmp_path / "busy"
    hold = "import sys, time\nfrom clipzss.engine.run_lock import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n"
    hold += "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=rf"busy is in use by pid {holder.pid} on host .+, started 20"):
            train(load_config(None, tiny_overrides(assets, out)))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "mlflow_run_id").exists()
    with run_dir_lock(out):  # the kernel released the killed holder's lock
        pass


def test_nothing_to_resume_and_meaningless_values_are_refused_before_anything_runs(assets, tmp_path):
    with pytest.raises(ResumeError, match=r"nothing to resume in .*empty \(no checkpoints"):
        train_main([*tiny_overrides(assets, tmp_path / "empty"), "--resume"])
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0, got -1\.0"):
        train_main([*tiny_overrides(assets, tmp_path / "bad"), "optim.lr=-1"])
    assert not (tmp_path / "empty").exists() and not (tmp_path / "bad").exists()


def test_an_mlflow_outage_loses_nothing_and_sync_delivers_it(assets, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    down = {"now": False}

    def unless_down(call):
        def guarded(self, *args, **kwargs):
            if down["now"]:
                raise requests.exceptions.ConnectionError("connection refused (test outage)")
            return call(self, *args, **kwargs)

        return guarded

    for name in ("log_batch", "log_artifact", "log_image", "log_dict", "set_terminated", "set_tag"):
        monkeypatch.setattr(MlflowClient, name, unless_down(getattr(MlflowClient, name)))
    monkeypatch.setattr(spool, "FLUSH_SECONDS", 1.0)

    def server_dies(metrics, checkpoint):
        down["now"] = True

    out = tmp_path / "outage"
    final = train(load_config(None, tiny_overrides(assets, out)), report=server_dies)  # the server never comes back
    assert final["step"] == 4 and (out / "model.pt").is_file()
    assert mlflow_run(out)[0] == "RUNNING" and spool.pending_records(out) > 0
    down["now"] = False  # the server is back
    assert cli_main(["sync", str(out)]) == 0
    status, steps, params, _ = mlflow_run(out)
    assert status == "FINISHED" and spool.pending_records(out) == 0
    assert steps["train/loss/total"] == [1, 2, 3, 4] and steps["val/hIoU"] == [2, 4]
    assert params["optim.lr"] == "0.001"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts((out / "mlflow_run_id").read_text().strip())}
    assert {"model.pt", "results.txt", "config.yaml"} <= artifacts


def test_ctrl_c_then_resume_with_a_new_lr_commits_each_step_once(assets, tmp_path):
    out = tmp_path / "ctrlc"
    overrides = tiny_overrides(assets, out, **{"run.eval_interval": 3})

    def ctrl_c(metrics, checkpoint):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), report=ctrl_c)
    status, steps, _, _ = mlflow_run(out)
    assert status == "KILLED" and steps["train/loss/total"] == [1, 2, 3]
    assert latest_checkpoint(out).name == "step_00000002.pt"  # step 3 is recomputed on resume
    with pytest.raises(ConfigError, match=r"--resume cannot change data\.batch_size \(2 -> 1\)"):
        train(load_config(None, [*overrides, "data.batch_size=1"]), resume=True)
    train(load_config(None, [*overrides, "optim.max_iters=5", "optim.lr=5e-4"]), resume=True)
    status, steps, params, _ = mlflow_run(out)
    assert status == "FINISHED" and steps["train/loss/total"] == [1, 2, 3, 4, 5] and steps["val/hIoU"] == [3, 5]
    assert params["optim.lr"] == "0.001" and params["optim.lr.from_step_2"] == "0.0005"
    assert params["optim.max_iters.from_step_2"] == "5"
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    groups = load_checkpoint(out / "checkpoints" / "step_00000005.pt")["optimizer"]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([5e-4, 5e-4, 5e-3, 5e-3])


def test_sigterm_writes_a_checkpoint_and_ends_the_run_killed(assets, tmp_path):
    out = tmp_path / "term"
    long_run = {"optim.max_iters": 400, "run.eval_interval": 0, "run.checkpoint_interval": 0}
    cmd = [sys.executable, "-m", "clipzss.cli", "train", *tiny_overrides(assets, out, **long_run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal, deadline = out / spool.JOURNAL, time.monotonic() + 240
    while not (journal.is_file() and "log_metrics" in journal.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = load_checkpoint(latest_checkpoint(out))["step"]
    assert 0 < step < 400 and f"stopped after step {step}" in err
    status, steps, _, _ = mlflow_run(out)
    assert status == "KILLED" and steps["train/loss/total"] == list(range(1, step + 1))


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["student"]


def test_a_process_group_sigterm_stops_like_a_main_process_one_and_resumes_exactly(assets, tmp_path):
    """What Slurm, systemd and Kubernetes send: SIGTERM to every process of the job, the DataLoader workers too."""
    out = tmp_path / "group"
    # poly_power 0: the lr does not depend on optim.max_iters, so the resumed run can stop 2 steps after the signal
    # and still equal an uninterrupted run of that length
    steady = {"optim.poly_power": 0, "run.eval_interval": 0, "run.checkpoint_interval": 0, "tracking.log_images": False}
    overrides = tiny_overrides(assets, out, **steady, **{"data.num_workers": 2})
    cmd = [sys.executable, str(REPO / "clipzss" / "train.py"), *overrides]
    proc = subprocess.Popen([*cmd, "optim.max_iters=400"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    journal, deadline = out / spool.JOURNAL, time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        logged = [r["args"][1] for r in spool.read_journal(journal) if r["op"] == "log_metrics"]
        if logged and max(logged) >= 2 and len(children(proc.pid)) >= 2:
            break
        time.sleep(0.2)
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert len(workers) == 2 and "DataLoader worker" not in err, err[-3000:]
    step = load_checkpoint(latest_checkpoint(out))["step"]
    assert 2 <= step < 400 and f"SIGTERM: stopped after step {step}," in err
    status, steps, _, _ = mlflow_run(out)
    assert status == "KILLED" and steps["train/loss/total"] == list(range(1, step + 1))

    resumed = subprocess.run([*cmd, f"optim.max_iters={step + 2}", "--resume"], env=ENV, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status, steps, _, _ = mlflow_run(out)
    assert status == "FINISHED" and steps["train/loss/total"] == list(range(1, step + 3))
    reference = tmp_path / "reference"  # an uninterrupted run, in a process of its own (the same thread count)
    untouched = {**steady, "optim.max_iters": step + 2, "tracking.enabled": False}
    done = subprocess.run([sys.executable, str(REPO / "clipzss" / "train.py"), *tiny_overrides(assets, reference,
                          **untouched)], env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    mine, theirs = student_weights(out), student_weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_scheduler_stop_is_killed_and_a_rerun_gets_a_fresh_mlflow_run(assets, tmp_path):
    out = tmp_path / "stopped"

    def ray_stops_the_trial(metrics, checkpoint):
        raise SystemExit(0)  # what Ray 2.60's tune.report raises when ASHA ends a trial

    with pytest.raises(SystemExit):
        train(load_config(None, tiny_overrides(assets, out, **{"run.checkpoint_interval": 0, "data.batch_size": 1})),
              report=ray_stops_the_trial)  # fmt: skip
    status, _, params, tags = mlflow_run(out)
    assert status == "KILLED" and tags[STOPPED_EARLY_TAG] == "stopped early at step 2"
    assert params["data.batch_size"] == "1" and latest_checkpoint(out) is None
    first_id = (out / "mlflow_run_id").read_text()
    train(load_config(None, tiny_overrides(assets, out, **{"optim.max_iters": 2, "tracking.log_images": "false"})))
    status, _, params, _ = mlflow_run(out)
    assert (out / "mlflow_run_id").read_text() != first_id
    assert status == "FINISHED" and params["data.batch_size"] == "2"


def test_a_full_disk_names_the_checkpoint_and_leaves_no_partial_file(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the kernel refuse the write, as ENOSPC would."""
    script = (
        "import resource, signal, sys, torch\n"
        "from clipzss.engine.checkpoint import save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "save_checkpoint(sys.argv[1], 1, {'w': torch.zeros(10)})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "save_checkpoint(sys.argv[1], 2, {'w': torch.zeros(100_000)})\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert done.returncode != 0
    assert "CheckpointWriteError: cannot write" in done.stderr and "step_00000002.pt" in done.stderr, done.stderr
    assert "MiB free on that disk" in done.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001.pt"]
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["w"], torch.zeros(10))
