"""The README's cluster commands for real: `ray up` cluster/local.yaml against an sshd of the test's own, `ray submit`
the smoke sweep, check MLflow, `ray down` — and nothing of the user's (dotfiles, home) touched, no process left.

Slow (about 2-3 minutes on 2 cores): run by its own bounded step of .ci/run (`pytest -m slow ...`), not by the
default suite. Its Ray head lives in a PID namespace of its own (see local_head.py), so its `ray stop` cannot end
anybody else's Ray on a shared machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from local_head import missing_tools, start_local_head

pytestmark = pytest.mark.slow


@pytest.fixture
def head():
    missing = missing_tools()
    if missing:
        pytest.skip(f"LOUD SKIP: the real launcher test needs {missing}: `bash .ci/install` installs them with apt")
    head = start_local_head()
    yield head
    head.close()


def _home_fingerprint() -> dict[str, str]:
    """Hashes of the user's dotfiles and the names the launcher would write into a home it used."""
    home = Path.home()
    names = [".bashrc", ".profile", ".bash_profile", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem",
             "backbones.py", "clipzss", "mlflow.db"]  # fmt: skip
    return {n: hashlib.sha256((home / n).read_bytes()).hexdigest() if (home / n).is_file() else str((home / n).exists())
            for n in names}  # fmt: skip


def _check_sweep_in_mlflow(db: Path) -> None:
    from mlflow.tracking import MlflowClient

    from clipzss.sweep.summary import column

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("clipzss")
    assert experiment is not None, f"no 'clipzss' experiment in {db}"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2, [(r.info.run_name, r.info.status) for r in runs]
    assert all("val/hIoU" in r.data.metrics for r in children)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "trials.json" in artifacts, artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(db.parent))).read_text())
    assert {column("student.arch"), column("val/hIoU")} <= set(table["columns"]) and len(table["data"]) == 2, table


def test_ray_up_submit_down_on_the_local_cluster(head):
    before = _home_fingerprint()
    up, _ = head.ray("up", "-y", str(head.yaml_path), "--no-config-cache")
    print(f"\nlocal cluster: ray up {up:.0f} s")
    submit, out = head.ray("submit", str(head.yaml_path), "sweeps/backbones.py", "--", "--address", "auto", "--smoke")
    print(f"local cluster: ray submit (smoke sweep) {submit:.0f} s")
    assert "best trial" in out, out[-3000:]
    home = head.state / "home"
    _check_sweep_in_mlflow(home / "mlflow.db")
    assert "Token authentication is disabled" not in out
    down, _ = head.ray("down", "-y", str(head.yaml_path))
    print(f"local cluster: ray down {down:.0f} s")
    left = head.leftovers()
    assert left == [], f"`ray down` left processes behind: {left}"
    assert _home_fingerprint() == before, "the launcher changed the user's home"
