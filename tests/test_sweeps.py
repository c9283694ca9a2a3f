"""The TPE + ASHA backbone search through its entry script: search space, and 2 tiny real trials end to end on CPU
with the MLflow parent, nested children, the trials table, Optuna's plots and the retrain command."""

import json
import shutil
import time
from pathlib import Path

import pytest
from sweep_fixtures import private_ray_env, ray_tmpdir, run_script
from tiny_run import assert_loads_as_student, tiny_overrides

from clipzss.config import load_config

pytest.importorskip("ray")
backbones = pytest.importorskip("sweeps.backbones")
from clipzss.sweep import space  # noqa: E402
from clipzss.sweep.summary import METRIC  # noqa: E402


def test_smoke_defaults_and_explicit_flags():
    opts = backbones.parse_args(["--smoke"])
    assert (opts.samples, opts.max_concurrent, opts.shape.cpus_per_worker, opts.shape.gpus_per_worker) == (2, 2, 1, 0)
    assert opts.shape.workers({"student.arch": "segformer_tiny"}) == 1
    assert (opts.archs, opts.scales) == (space.SMOKE_ARCHS, space.SMOKE_SCALES)
    opts = backbones.parse_args(["--archs", "swin_tiny,resnet50", "--scales", "8", "4,8", "--samples", "5"])
    assert (opts.archs, opts.scales, opts.samples, opts.shape.gpus_per_worker) == (
        ("swin_tiny", "resnet50"),
        ("8", "4,8"),
        5,
        1.0,
    )


def test_sampled_values_become_typed_overrides():
    sample = {"plm.kmeans.scales": "4,8,16", "optim.lr": 1.5e-05, "student.arch": "swin_tiny", "glm.weight": 0.0}
    cfg = load_config("voc", space.sample_overrides(sample))
    assert cfg.plm.kmeans.scales == (4, 8, 16) and cfg.optim.lr == 1.5e-05
    assert cfg.student.arch == "swin_tiny" and cfg.glm.weight == 0.0


@pytest.mark.parametrize(("archs", "scales"), [(space.ARCHS, space.SCALES), (space.SMOKE_ARCHS, space.SMOKE_SCALES)])
def test_every_corner_of_the_search_space_is_a_valid_config(archs, scales):
    found = space.search_space(load_config("synthetic"), archs, scales)
    assert {"student.arch", "plm.kmeans.scales", "optim.lr", "plm.kmeans.fuse_threshold", "glm.weight"} <= set(found)
    corners = list(space.space_corners(found))
    assert len(corners) == len(archs) * len(scales) * 4 * 2**3  # glm.weight choices x 3 numeric ranges at 2 bounds
    assert space.check_space("synthetic", [], found) == len(corners)


@pytest.mark.parametrize("preset", ["synthetic", "voc"])
def test_the_lr_range_is_centred_on_the_swept_preset(preset):
    base = load_config(preset)
    lr = space.search_space(base)["optim.lr"]
    assert lr.lower < base.optim.lr < lr.upper and lr.upper / lr.lower == pytest.approx(space.LR_SPAN**2)


def test_first_points_try_every_backbone_and_every_scale_set():
    base = load_config("synthetic", ["glm.weight=0.3", "glm.tau=0.5"])
    points = space.first_points(space.search_space(base), base, ("a", "b", "c"), ("2", "2,4"))
    assert points[0]["optim.lr"] == base.optim.lr and points[0]["glm.weight"] == 0.0  # 0.3 is not a choice
    assert points[0]["glm.tau"] == 0.2  # clamped into the range
    assert [p["student.arch"] for p in points] == ["a", "b", "c"]
    assert [p["plm.kmeans.scales"] for p in points] == ["2", "2,4", "2"]


def test_a_bad_search_value_names_its_key():
    base = load_config("synthetic")
    with pytest.raises(Exception, match="student.arch.*no_such_net"):
        space.check_space("synthetic", [], space.search_space(base, ("no_such_net",), ("8",)))
    with pytest.raises(Exception, match="plm.kmeans.scales"):
        space.check_space("synthetic", [], space.search_space(base, ("segformer_b0",), ("4,x",)))


def test_a_sweep_name_becomes_a_valid_registry_alias():
    from clipzss.sweep.registry import alias_for

    assert alias_for("backbones_20261201_031500") == "backbones_20261201_031500"
    assert alias_for("my sweep.v2") == "my_sweep_v2"
    assert alias_for("v3") == "sweep_v3" and alias_for("latest") == "sweep_latest"  # names MLflow reserves


def test_smoke_sweep_two_trials_nested_in_mlflow(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    ray_tmp = ray_tmpdir()
    sets = [arg for item in tiny_overrides(assets, tmp_path / "unused") for arg in ("--set", item)]
    args = ["--smoke", "--config", "voc", "--storage", str(tmp_path / "ray"), "--name", "smoke", *sets]
    env = private_ray_env(ray_tmp)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # a user's shell naming another store
    start = time.perf_counter()
    done = run_script("backbones.py", args, tmp_path, env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"smoke sweep: {time.perf_counter() - start:.1f} s")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("clipzss").experiment_id],
                                   "tags.`mlflow.runName` = 'backbones smoke'")  # fmt: skip
    assert parent.info.status == "FINISHED" and f"best/{METRIC}" in parent.data.metrics
    command = parent.data.tags["clipzss.retrain"]
    assert command == "accelerate launch -m clipzss.train ray/smoke/best_config.yaml" and command in done.stdout
    best = load_config(str(tmp_path / "ray" / "smoke" / "best_config.yaml"))  # what the retrain command loads
    assert best.student.arch in space.SMOKE_ARCHS and best.run.output_dir == "runs/smoke_best"

    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    table = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
    assert table["status"] == ("TERMINATED", "TERMINATED") and table["step"] == (4.0, 4.0)
    assert all(0 <= v <= 100 for v in table["val/hIoU"]) and not any("." in name for name in table)
    assert sorted(table["student_arch"]) == sorted(space.SMOKE_ARCHS)  # both archs, both scale sets
    assert sorted(table["plm_kmeans_scales"]) == sorted(space.SMOKE_SCALES)
    # every reported Ray checkpoint is a folder holding exactly one trainer checkpoint file
    checkpoints = sorted((tmp_path / "ray" / "smoke").glob("*/checkpoint_*"))
    assert len(checkpoints) == 4 and all([p.name for p in c.iterdir()] == [f"step_0000000{s}.pt"] for c, s in zip(
        checkpoints, [2, 4, 2, 4], strict=True))  # fmt: skip

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(METRIC in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "best_config.yaml", "optuna"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png"} <= plots

    # the best trial's student is a version of a registered model, aliased with the sweep's name, and loads
    uri = parent.data.tags["clipzss.registered_model"]
    assert uri == "models:/clipzss-clipzss@smoke" and uri in done.stdout
    version = client.get_model_version_by_alias("clipzss-clipzss", "smoke")
    best = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, METRIC)) for c in children}
    assert best[version.run_id] == max(best.values()) and version.tags["clipzss.sweep"] == "smoke"
    assert_loads_as_student(uri, client.tracking_uri)


def test_a_sweep_joined_with_address_hands_the_clusters_mlflow_server_to_its_trials(monkeypatch, tmp_path):
    from clipzss.sweep import endpoints, runner
    from clipzss.sweep.options import SweepOptions

    joined = []
    monkeypatch.setattr(runner, "_connect", lambda opts: joined.append(opts.address) or True)
    monkeypatch.setattr(endpoints, "cluster_tracking_uri", lambda: "http://10.0.0.5:5000")
    opts = SweepOptions(address="auto", storage=str(tmp_path), overrides=["tracking.enabled=false"])
    sweep = runner.prepare(opts, "backbones")
    assert joined == ["auto"] and "tracking.uri=http://10.0.0.5:5000" in sweep.fixed
    local = runner.prepare(SweepOptions(storage=str(tmp_path), overrides=["tracking.enabled=false"]), "backbones")
    assert any(o.startswith("tracking.uri=sqlite:///") for o in local.fixed) and joined == ["auto"]


def test_the_benchmark_cost_columns_of_a_trained_student(trained_run):
    from clipzss.sweep.cost import student_cost

    cost = student_cost(trained_run / "model.pt")
    assert cost["cost/params_M"] > 0 and cost["cost/gflops"] > 0 and cost["cost/images_per_s"] > 0


@pytest.mark.slow
def test_the_overhead_benchmark_times_the_same_trials_both_ways(assets, tmp_path):
    ray_tmp = ray_tmpdir()
    sets = [arg for item in tiny_overrides(assets, tmp_path / "unused") for arg in ("--set", item)]
    args = ["--config", "voc", "--steps", "2", "--workdir", str(tmp_path / "w"), *sets]
    done = run_script("overhead.py", args, tmp_path, private_ray_env(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sweep (TPE + ASHA, private Ray) |" in done.stdout and "sweep overhead: " in done.stdout
    for run in ("direct_1", "direct_2"):  # each direct run trained both trials to the end, as the sweep did
        assert sorted(p.parent.name for p in (tmp_path / "w" / run).glob("*/model.pt")) == ["trial0", "trial1"]
    finished = [load_config(str(c)) for c in (tmp_path / "w" / "ray").glob("overhead_*/*/config.yaml")]
    assert sorted(c.plm.kmeans.scales for c in finished) == [(2,), (2, 4)]
