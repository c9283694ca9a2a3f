"""A disk that fills up under a real training: the run folder and the SQLite store on a small tmpfs of their own.

The disk is filled (a filler file to the last byte) from the trainer's report callback, so the spool meets the
out-of-space errors where a real run meets them: appending to its journal, saving its delivery position, and the
store writing its database.
"""

import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tiny_run import tiny_overrides

from clipzss.cli import main as cli_main
from clipzss.config import load_config
from clipzss.engine import spool
from clipzss.engine.checkpoint import CheckpointWriteError
from clipzss.train import FAILURE_TAG, train


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs mounted for this test alone (mounting needs root; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write ``disk/filler`` until not one more byte fits."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while f.write(b"\0" * chunk) == chunk:
                    pass
            except OSError:
                pass
    return filler


def run_of(out: Path, uri: str):
    """(status, {metric: [steps]}, tags) of the MLflow run of ``out``."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    return run.info.status, steps, run.data.tags


def strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.suffix in (".tmp", ".lock"))


class Console:
    """What the run printed so far (pytest's capture, read as it grows)."""

    def __init__(self, capsys):
        self.capsys, self.text = capsys, ""

    def read(self) -> str:
        self.text += self.capsys.readouterr().out
        return self.text

    def wait_for(self, words: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while words not in self.read():
            assert time.monotonic() < deadline, f"never printed {words!r}:\n{self.text[-3000:]}"
            time.sleep(0.1)


class Sink:
    """A store that takes every call (on another disk), recording them."""

    uri, run_id = "http://127.0.0.1:9", "run0"

    def __init__(self):
        self.calls = []

    def __getattr__(self, op):
        return lambda *args, **kwargs: self.calls.append((op, args))


def test_the_spool_delivers_while_its_disk_is_full_and_writes_its_journal_when_space_returns(small_disk, capsys):
    run = small_disk / "run"
    sink, journal = Sink(), run / spool.JOURNAL
    s = spool.Spool(sink, run)
    s.log_metrics({"loss": 1.0}, 1)
    filler = fill(small_disk)
    for step in range(2, 200):  # more lines than the room left in the journal's last page
        s.log_metrics({"loss": 1.0 / step}, step)
    s.finish("FAILED")
    deadline = time.monotonic() + 60
    while s.pending():
        assert time.monotonic() < deadline, "the spool stopped delivering"
        time.sleep(0.05)
    on_disk = len(spool.read_journal(journal))
    assert on_disk < 200 and journal.read_bytes().endswith(b"\n")  # some lines refused, none torn
    assert strays(small_disk) == []
    filler.unlink()
    s.log_metrics({"loss": 0.0}, 200)  # the next append writes what waited, in order
    assert s.close(wait=10) == 0
    records = spool.read_journal(journal)
    assert [r["args"][1] for r in records if r["op"] == "log_metrics"] == list(range(1, 201))
    assert [a[1] for op, a in sink.calls if op == "log_metrics"] == list(range(1, 201))
    assert [op for op, _ in sink.calls].count("finish") == 1 and spool.pending_records(run) == 0
    assert "No space left on device" in capsys.readouterr().out and strays(small_disk) == []


def test_a_store_on_a_full_disk_is_named_and_delivery_goes_on_when_space_returns(assets, small_disk, capsys,
                                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(spool, "MAX_BACKOFF", 0.2)
    out, uri = small_disk / "run", f"sqlite:///{small_disk / 'mlflow.db'}"
    overrides = tiny_overrides(assets, out, **{"optim.max_iters": 6, "run.eval_interval": 1,
                                               "run.checkpoint_interval": 0, "tracking.log_images": False})  # fmt: skip
    console, filler = Console(capsys), small_disk / "filler"

    def the_disk_fills_then_frees(metrics, checkpoint):
        if metrics["step"] == 2:
            fill(small_disk)
        if metrics["step"] == 4:
            console.wait_for(f"MLflow at {uri} cannot write: the disk holding {small_disk} (")
            filler.unlink()

    final = train(load_config(None, overrides), report=the_disk_fills_then_frees)
    said = console.read()
    assert final["step"] == 6 and not filler.exists()
    assert "unreachable" not in said and "did not answer" not in said, said[-3000:]
    status, steps, _ = run_of(out, uri)
    assert status == "FINISHED" and steps["train/loss/total"] == [1, 2, 3, 4, 5, 6]
    assert set(steps["val/hIoU"]) == {1, 2, 3, 4, 5, 6} and spool.pending_records(out) == 0
    assert strays(small_disk) == []


def test_a_full_run_folder_fails_the_run_with_its_reason_and_sync_settles_the_rest(assets, small_disk, tmp_path,
                                                                                    capsys):  # fmt: skip
    out, uri = small_disk / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store has room, the run folder not
    overrides = tiny_overrides(assets, out, **{"optim.max_iters": 4, "run.eval_interval": 2,
                                               "run.checkpoint_interval": 4, "tracking.log_images": False,
                                               "tracking.uri": uri})  # fmt: skip
    console = Console(capsys)

    def the_disk_fills(metrics, checkpoint):
        if metrics["step"] == 2:
            fill(small_disk)

    with pytest.raises(CheckpointWriteError, match="step_00000004.pt"):
        train(load_config(None, overrides), report=the_disk_fills)
    said = console.read()
    assert f"cannot write {out / spool.CURSOR} (No space left on device;" in said, said[-3000:]
    status, steps, tags = run_of(out, uri)
    assert status == "FAILED" and tags[FAILURE_TAG].startswith("CheckpointWriteError: cannot write ")
    assert steps["train/loss/total"] == [1, 2, 3, 4]
    assert strays(small_disk) == []

    (small_disk / "filler").unlink()  # space is back: the journal's lines since the fill are kept, so sync
    assert cli_main(["sync", str(out)]) == 0  # redelivers them, a duplicate MLflow ignores
    status, steps, tags = run_of(out, uri)
    assert status == "FAILED" and steps["train/loss/total"] == [1, 2, 3, 4] and spool.pending_records(out) == 0
    assert strays(small_disk) == []
