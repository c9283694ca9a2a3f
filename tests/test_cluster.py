"""The cluster files, checked offline by Ray's and Accelerate's own loaders (no ssh, no cloud, no cluster)."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
ray_util = pytest.importorskip("ray.autoscaler._private.util")


def ray_checked(name: str) -> dict:
    config = yaml.safe_load((CLUSTER / name).read_text())
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


def test_aws_cluster_passes_ray_schema_and_installs_the_project():
    cfg = ray_checked("cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    assert all(t["node_config"]["InstanceType"].startswith("g5.") for t in cfg["available_node_types"].values())
    assert cfg["file_mounts"]["/home/ray/clipzss"] == "."
    assert any("/home/ray/clipzss[sweep]" in c for c in cfg["setup_commands"])
    import ray

    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"  # client and cluster Ray agree


def test_local_cluster_passes_ray_schema_and_reuses_the_checkout():
    cfg = ray_checked("local.yaml")
    assert cfg["provider"] == {**cfg["provider"], "type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert ".local-head/sshd_config" in cfg["auth"]["ssh_proxy_command"]  # the head's own sshd (local-head.sh)
    assert cfg["setup_commands"] == [] and cfg["file_mounts"] == {}  # nothing installed, nothing copied
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start


def test_cluster_files_are_secure_by_default():
    aws = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]  # every node, every Ray process
    assert "/home/ray/.ray/auth_token" in aws["file_mounts"]
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--labels=clipzss/mlflow-port=5000" in head and "mlflow_head.py" in head
    local_head = (CLUSTER / "local-head.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in local_head and "PasswordAuthentication no" in local_head


def test_aws_nodes_share_storage_and_data():
    aws = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    profiles = {t["node_config"].get("IamInstanceProfile", {}).get("Arn") for t in aws["available_node_types"].values()}
    assert len(profiles) == 1 and None not in profiles  # workers write s3:// checkpoints with the head's rights
    assert all(p.startswith("/") for p in aws["rsync_exclude"])  # anchored: clipzss/data/ is copied
    assert any("clipzss prepare" in c for c in aws["setup_commands"])  # every node prepares its data


def test_anchored_excludes_copy_the_data_package(tmp_path):
    """rsync itself, with the launcher's options: /data at the root is skipped, clipzss/data/ is not."""
    import shutil
    import subprocess

    if shutil.which("rsync") is None:
        pytest.skip("rsync missing (.ci/install installs it)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    for path in ("clipzss/data/__init__.py", "data/voc.tar", "runs/x/model.pt", "README.md"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text("x")
    excludes = [arg for p in yaml.safe_load((CLUSTER / "cluster.yaml").read_text())["rsync_exclude"]
                for arg in ("--exclude", p)]  # fmt: skip
    subprocess.run(["rsync", "-a", *excludes, f"{src}/", str(dst)], check=True)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == ["README.md", "clipzss/data/__init__.py"]


def test_ray_schema_check_rejects_a_typo():
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        ray_util.validate_config(ray_util.prepare_config(config))


def test_accelerate_config_loads_as_8_gpu_bf16():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(CLUSTER / "accelerate" / "multi_gpu.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (8, 1, "bf16")


def test_endpoint_discovery_needs_a_connected_ray():
    from clipzss.sweep.endpoints import cluster_tracking_uri

    with pytest.raises(RuntimeError, match="connect to the cluster first"):
        cluster_tracking_uri()


def test_mlflow_head_backs_up_and_restores_its_store(tmp_path, monkeypatch):
    """cluster/mlflow_head.py: a new head restores the SQLite backend its predecessor copied to S3."""
    import importlib.util
    import sqlite3

    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    spec = importlib.util.spec_from_file_location("mlflow_head", CLUSTER / "mlflow_head.py")
    head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head)
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    with sqlite3.connect(old) as db:
        db.execute("create table runs (run_uuid text)")
        db.execute("insert into runs values ('abc')")
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bucket")
        assert not head.restore(s3, "s3://bucket/mlflow", new)  # nothing stored yet: a new store
        head.back_up(s3, "s3://bucket/mlflow", old)
        assert head.restore(s3, "s3://bucket/mlflow", new)
        assert not head.restore(s3, "s3://bucket/mlflow", old)  # a store already on the head is kept
    with sqlite3.connect(new) as db:
        assert db.execute("select run_uuid from runs").fetchall() == [("abc",)]
    with pytest.raises(ValueError, match="--store '/srv/mlflow'"):
        head.back_up(None, "/srv/mlflow", old)
