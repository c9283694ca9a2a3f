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


def test_aws_nodes_share_data():
    aws = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
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
    monkeypatch.syspath_prepend(str(CLUSTER))  # as running the script does: its folder first on sys.path
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
        assert not head.restore(s3, "s3://bucket/mlflow", tmp_path / "auth.db", head.AUTH_DB)  # kept apart
        head.back_up(s3, "s3://bucket/mlflow", old, head.AUTH_DB)
        assert head.restore(s3, "s3://bucket/mlflow", tmp_path / "auth.db", head.AUTH_DB)
    with sqlite3.connect(new) as db:
        assert db.execute("select run_uuid from runs").fetchall() == [("abc",)]
    with pytest.raises(ValueError, match="--store '/srv/mlflow'"):
        head.back_up(None, "/srv/mlflow", old)


def _policy(name: str) -> list[dict]:
    import json

    statements = json.loads((CLUSTER / "iam" / name).read_text())["Statement"]
    for statement in statements:
        for key in ("Action", "Resource"):
            statement[key] = [statement[key]] if isinstance(statement[key], str) else statement[key]
    return statements


def _allowed(statements: list[dict], action: str) -> list[str]:
    """The resources ``action`` is allowed on (exact action names: the policies use no wildcards)."""
    return [r for s in statements if s["Effect"] == "Allow" and action in s["Action"] for r in s["Resource"]]


def test_aws_profiles_give_the_head_the_autoscaler_and_workers_only_checkpoints():
    aws = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    arn = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in aws["available_node_types"].items()}
    assert arn["head"].endswith(":instance-profile/clipzss-head")
    assert arn["gpu_worker"].endswith(":instance-profile/clipzss-worker")
    head, worker = _policy("head-policy.json"), _policy("worker-policy.json")
    # Ray's AWS node provider: the calls the head's autoscaler makes to launch, tag, find and end workers
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:TerminateInstances"):
        assert _allowed(head, action) == ["*"], action
    assert _allowed(head, "iam:PassRole") == ["arn:aws:iam::YOUR_ACCOUNT_ID:role/clipzss-worker"]  # no other role
    mlflow_store, sweeps = "arn:aws:s3:::YOUR_BUCKET/clipzss-mlflow/*", "arn:aws:s3:::YOUR_BUCKET/clipzss-sweeps/*"
    assert {mlflow_store, sweeps} <= set(_allowed(head, "s3:PutObject"))
    assert not [a for s in worker for a in s["Action"] if not a.startswith("s3:")]  # no EC2, no IAM
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert _allowed(worker, action) == [sweeps], action  # trial checkpoints, never the MLflow store
    storage = aws["head_start_ray_commands"][-1]
    assert "--store s3://YOUR_BUCKET/clipzss-mlflow" in storage


@pytest.fixture
def mocked_aws(monkeypatch, tmp_path):
    """moto's in-process AWS (EC2, IAM) in us-west-2, with HOME in tmp_path (Ray writes its SSH key there)."""
    moto = pytest.importorskip("moto")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-west-2", "HOME": str(tmp_path)}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    for cached in (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die):
        cached.cache_clear()  # no boto client made outside the mock (or in another test's) is reused
    with moto.mock_aws():
        yield aws_config


def _security_group_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("aws_security_group", CLUSTER / "aws_security_group.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ssh_ranges(ec2, group_id: str) -> list[str]:
    rules = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]
    return sorted(r["CidrIp"] for rule in rules if rule.get("FromPort") == 22 for r in rule["IpRanges"])


def test_ray_aws_bootstrap_keeps_both_profiles_and_ssh_from_the_operator_only(mocked_aws):
    """Ray's own AWS bootstrap (what `ray up` runs first) on cluster.yaml, against moto: with the group that
    cluster/aws_security_group.py makes, Ray keeps the head's profile (no default role), gives workers theirs, adds
    no rule to the group and opens SSH to nobody else."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-west-2")
    operator = "198.51.100.7/32"
    group = _security_group_module().ensure_security_group(ec2, "clipzss-ray", operator)
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == ["sg-YOUR_SECURITY_GROUP_ID"]  # the placeholder
        node_type["node_config"]["SecurityGroupIds"] = [group]  # what the docs tell the operator to paste
    prepared = ray_util.prepare_config(config)
    ray_util.validate_config(prepared)  # `ray up`'s order: the schema, then the provider's bootstrap
    booted = mocked_aws.bootstrap_aws(prepared)
    nodes = {name: t["node_config"] for name, t in booted["available_node_types"].items()}
    assert booted["head_node"] == {}  # Ray's default head role was not created or attached
    assert nodes["head"]["IamInstanceProfile"]["Arn"].endswith("/clipzss-head")
    assert nodes["gpu_worker"]["IamInstanceProfile"]["Arn"].endswith("/clipzss-worker")
    assert all(n["SecurityGroupIds"] == [group] for n in nodes.values())
    assert _ssh_ranges(ec2, group) == [operator]
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert not [g["GroupName"] for g in groups if g["GroupName"].startswith("ray-autoscaler")]  # none of Ray's own


def test_ray_aws_bootstrap_refuses_the_placeholder_group(mocked_aws, capfd):
    """An operator who skipped the security group gets an error from `ray up`, not a group open to 0.0.0.0/0."""
    import boto3

    before = boto3.client("ec2", region_name="us-west-2").describe_security_groups()["SecurityGroups"]
    with pytest.raises(AssertionError):  # Ray's cli_logger.abort
        mocked_aws.bootstrap_aws(ray_util.prepare_config(yaml.safe_load((CLUSTER / "cluster.yaml").read_text())))
    printed = capfd.readouterr()
    assert "Failed to detect a security group with id equal to any of the configured" in printed.out + printed.err
    after = boto3.client("ec2", region_name="us-west-2").describe_security_groups()["SecurityGroups"]
    assert len(after) == len(before)


def test_security_group_script_closes_ssh_opened_to_everyone(mocked_aws):
    import boto3

    ec2 = boto3.client("ec2", region_name="us-west-2")
    module = _security_group_module()
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="clipzss-ray", Description="made by hand", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpProtocol="tcp", FromPort=22, ToPort=22, CidrIp="0.0.0.0/0")
    assert module.ensure_security_group(ec2, "clipzss-ray", "203.0.113.0/24") == group
    assert module.ensure_security_group(ec2, "clipzss-ray", "203.0.113.0/24") == group  # a rerun changes nothing
    assert _ssh_ranges(ec2, group) == ["203.0.113.0/24"]
    with pytest.raises(ValueError, match="from everywhere"):
        module.ensure_security_group(ec2, "clipzss-ray", "0.0.0.0/0")


def _auth_module(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(CLUSTER))
    return importlib.import_module("mlflow_auth")


def test_mlflow_logins_are_made_once_and_readable_by_their_owner_only(tmp_path, monkeypatch):
    import configparser
    import subprocess
    import sys

    auth = _auth_module(monkeypatch)
    folder = tmp_path / "clipzss"
    done = subprocess.run([sys.executable, str(CLUSTER / "mlflow_auth.py"), "--dir", str(folder)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    admin, trials = auth.ensure_logins(folder)
    assert (admin.username, trials.username) == ("admin", "clipzss-sweeps")
    assert len(admin.password) >= 32 and admin.password != trials.password
    assert admin.password not in done.stdout and trials.password not in done.stdout  # never in a log line
    assert auth.ensure_logins(folder) == (admin, trials)  # kept: a later `ray up` of the same head reuses them
    config = auth.write_config(folder, tmp_path / "auth.db", admin)
    assert auth.server_secret(folder) == auth.server_secret(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        name: 0o600 for name in ("mlflow-admin.env", "mlflow-trials.env", "basic_auth.ini", "mlflow-flask-secret")
    }
    parsed = configparser.ConfigParser()
    parsed.read(config)
    assert parsed["mlflow"]["admin_password"] == admin.password and parsed["mlflow"]["default_permission"] == "READ"


def test_provision_sets_this_heads_passwords_in_a_restored_user_database(tmp_path, monkeypatch):
    """A new head restores the users' database of the last one: its own, new passwords replace the old ones, the
    trials' user stays no admin, and a store made before authentication is handed to the trials' user."""
    import sqlite3

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    auth = _auth_module(monkeypatch)
    tracking = tmp_path / "mlflow.db"
    with sqlite3.connect(tracking) as db:
        db.execute("create table experiments (experiment_id integer)")
        db.execute("create table registered_models (name text)")
        db.execute("insert into experiments values (1)")
        db.execute("insert into registered_models values ('clipzss-clipzss')")
    database = tmp_path / "mlflow-auth.db"
    old_admin, old_trials = auth.ensure_logins(tmp_path / "old")
    auth.provision(database, old_admin, old_trials, tracking=tracking)
    admin, trials = auth.ensure_logins(tmp_path / "new")
    auth.provision(database, admin, trials, tracking=tracking)
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{database}")
    assert store.authenticate_user("admin", admin.password) and not store.authenticate_user("admin", old_admin.password)
    assert store.authenticate_user("clipzss-sweeps", trials.password)
    assert store.get_user("admin").is_admin and not store.get_user("clipzss-sweeps").is_admin
    permission = store.get_registered_model_permission("clipzss-clipzss", "clipzss-sweeps").permission
    assert permission == "MANAGE" and store.get_experiment_permission("1", "clipzss-sweeps").permission == "MANAGE"


def test_every_node_shell_exports_the_trials_login(tmp_path):
    """The setup command of cluster.yaml, run by bash as Ray runs commands (`source ~/.bashrc && CMD`): before the
    login file exists the shell still runs CMD; after, CMD has the login in its environment."""
    import subprocess

    aws = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    (command,) = [c for c in aws["setup_commands"] if "mlflow-trials.env" in c]
    assert "/home/ray/.clipzss/mlflow-trials.env" in aws["cluster_synced_files"]  # Ray copies it to every worker
    assert any("cluster/mlflow_auth.py" in c for c in aws["head_setup_commands"])
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # a second `ray up` adds no second line
        subprocess.run(["bash", "-c", command], env=env, check=True)
    assert (tmp_path / ".bashrc").read_text().count("mlflow-trials.env") == 2  # one line, two mentions
    ray_style = 'source ~/.bashrc && echo "user=$MLFLOW_TRACKING_USERNAME"'
    assert subprocess.run(["bash", "-c", ray_style], env=env, capture_output=True, text=True,
                          check=True).stdout == "user=\n"  # fmt: skip
    (tmp_path / ".clipzss").mkdir()
    (tmp_path / ".clipzss" / "mlflow-trials.env").write_text("MLFLOW_TRACKING_USERNAME=clipzss-sweeps\n")
    out = subprocess.run(["bash", "-c", ray_style], env=env, capture_output=True, text=True, check=True).stdout
    assert out == "user=clipzss-sweeps\n"
