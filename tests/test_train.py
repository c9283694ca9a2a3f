"""The real trainer end to end on CPU: a tiny VOC-layout dataset, a tiny random-init open_clip teacher."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import REPO, tiny_overrides

from clipzss.config import load_config
from clipzss.engine.checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint
from clipzss.engine.tracking import TrackingError
from clipzss.method.objective import CLIPZSSObjective
from clipzss.train import NonFiniteLossError, train


def run_metrics(uri: str, output_dir: Path) -> tuple[str, dict[str, list[float]], dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = (output_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    history = {key: [m.value for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return run.info.status, history, run.data.params


def test_train_end_to_end_logs_everything(assets, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(assets, out))
    final = train(cfg)
    assert set(final) >= {"val/pAcc", "val/mIoU_S", "val/mIoU_U", "val/hIoU", "step"}
    assert final["step"] == 4 and 0 <= final["val/pAcc"] <= 100
    assert (out / MODEL_FILE).is_file() and (out / "config.yaml").is_file() and (out / "results.txt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert any((out / "images").glob("val_0_step*.png")) and any((out / "images").glob("pseudo_0_step*.png"))
    assert (out / "images" / "confusion_step4.png").is_file()
    status, history, params = run_metrics(cfg.tracking.uri, out)
    assert status == "FINISHED"
    assert params["plm.kmeans.scales"] == "[2, 4]" and params["teacher.model"] == assets["json"]
    for term in ("glm", "ce", "bce", "total"):  # every enabled term (NEL is off by default) logged, finite, non-zero
        values = history[f"train/loss/{term}"]
        assert len(values) == 4 and all(torch.isfinite(torch.tensor(v)) and v != 0 for v in values), term
    assert len(history["val/hIoU"]) == 2 and "train/plm/potential_classes" in history
    for key in ("coverage", "purity", "background", "potential_classes"):  # PLM diagnostics at every evaluation
        assert len(history[f"val/plm/{key}"]) == 2 and all(0 <= v <= 100 for v in history[f"val/plm/{key}"]), key
    # the checkpoint never holds the teacher
    state = load_checkpoint(out / "checkpoints" / "step_00000004.pt")
    assert not any(k.startswith("teacher") or ".clip." in k for k in state["model"])


def test_resume_reproduces_uninterrupted_run(assets, tmp_path):
    straight = tmp_path / "straight"
    train(load_config(None, tiny_overrides(assets, straight, **{"tracking.enabled": "false"})))

    class Killed(Exception):
        pass

    def kill_after_first_checkpoint(metrics, checkpoint):
        raise Killed

    resumed = tmp_path / "resumed"
    cfg = load_config(None, tiny_overrides(assets, resumed, **{"tracking.enabled": "false"}))
    with pytest.raises(Killed):
        train(cfg, report=kill_after_first_checkpoint)
    assert latest_checkpoint(resumed).name == "step_00000002.pt" and not (resumed / MODEL_FILE).exists()
    train(cfg)  # a second start without --resume leaves the killed run alone and writes beside it
    assert (tmp_path / "resumed_2" / MODEL_FILE).is_file()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000002.pt"]
    train(cfg, resume=True)
    a = torch.load(straight / MODEL_FILE, weights_only=True)["student"]
    b = torch.load(resumed / MODEL_FILE, weights_only=True)["student"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(assets, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CLIPZSSObjective.forward

    def poisoned(self, *args, **kwargs):
        losses, report = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["total"] = losses["total"] * float("nan")
        return losses, report

    monkeypatch.setattr(CLIPZSSObjective, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(None, tiny_overrides(assets, out, **{"run.log_interval": 4}))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss by step 4.*step_00000002\.pt"):
        train(cfg)
    good = load_checkpoint(latest_checkpoint(out))
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert run_metrics(cfg.tracking.uri, out)[0] == "FAILED"


def test_unreachable_mlflow_server_fails_fast_before_training(assets, tmp_path):
    out = tmp_path / "offline"
    cfg = load_config(None, tiny_overrides(assets, out, **{"tracking.uri": "http://127.0.0.1:9"}))
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:9.*unreachable"):
        train(cfg)
    assert not (out / "checkpoints").exists()


def test_two_process_gloo_run(assets, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU: real DDP with gathered GLM negatives."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "clipzss" / "train.py"), *tiny_overrides(assets, out, **{"data.batch_size": 1})]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / MODEL_FILE).is_file()
    assert "hIoU" in done.stdout
