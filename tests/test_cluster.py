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


def test_local_cluster_passes_ray_schema():
    cfg = ray_checked("local.yaml")
    assert cfg["provider"] == {**cfg["provider"], "type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert any(".ci/install" in c for c in cfg["setup_commands"])


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
