"""The benchmark grid: its table (mean ± std, paired comparison, markdown, heatmap) from records, and the whole
grid through ``sweeps/benchmark.py`` (one backbone x two scale sets x two seeds of tiny real trials)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sweep_fixtures import private_ray_env, ray_tmpdir, run_script
from tiny_run import assert_loads_as_student, tiny_overrides

from clipzss.sweep.table import cell_table, format_markdown, paired, plot_heatmap


def _records(shift: dict[tuple[str, str], list[float]]) -> list[dict]:
    return [{"backbone": b, "scales": s, "seed": seed, "mIoU_S": 40.0, "mIoU_U": 20.0 + h, "hIoU": 30.0 + h,
             "params_M": 0.5, "GFLOPs": 0.02, "images_per_s": 800.0, "device_hours": 0.01}
            for (b, s), values in shift.items() for seed, h in enumerate(values)]  # fmt: skip


def test_the_table_has_mean_std_cost_and_a_paired_test_against_the_reference():
    from scipy.stats import ttest_rel

    records = _records({("a", "2"): [0, 1, 2], ("a", "2,4"): [2, 4, 3], ("b", "2"): [5, 5, 5]})
    table = cell_table(records)
    assert table["backbone"] == ["a", "a", "b"] and table["reference"] == [True, False, False]
    assert table["hIoU_mean"][1] == pytest.approx(33.0) and table["hIoU_std"][1] == pytest.approx(np.std([2, 4, 3]))
    assert table["hIoU_diff_vs_ref_mean"][1] == pytest.approx(2.0)
    assert table["p_value"][1] == pytest.approx(ttest_rel([32, 34, 33], [30, 31, 32]).pvalue)
    assert table["device_hours"][0] == pytest.approx(0.03) and table["paired_seeds"] == [3, 3, 3]
    assert not any("." in name for name in table)  # MLflow renders dotted columns blank
    text = format_markdown(table)
    assert "| a | 2 | 3 | 40.0 ± 0.0 | 21.0 ± 0.8 | 31.0 ± 0.8 |" in text and "| ref |" in text
    assert cell_table(records, ("b", "2"))["reference"] == [False, False, True]
    with pytest.raises(ValueError, match="--reference 'c/8'.*a/2, a/2,4, b/2"):
        cell_table(records, ("c", "8"))


def test_paired_uses_only_shared_seeds_and_says_when_no_test_is_possible():
    from scipy.stats import ttest_rel

    assert paired({0: 1.0, 1: 2.0, 2: 3.0}, {1: 4.0, 2: 6.0}) == (
        2.5,
        0.5,
        pytest.approx(ttest_rel([4, 6], [2, 3]).pvalue),
        2,
    )
    mean, std, p, n = paired({0: 1.0}, {0: 3.0})
    assert (mean, std, n) == (2.0, 0.0, 1) and np.isnan(p)  # one seed: no test
    assert paired({0: 1.0}, {1: 3.0})[3] == 0


def test_the_heatmap_is_a_picture(tmp_path):
    from PIL import Image

    table = cell_table(_records({("a", "2"): [0, 1], ("a", "2,4"): [2, 4], ("b", "2"): [5, 5]}))
    width, height = Image.open(plot_heatmap(table, tmp_path / "h.png", "t")).size
    assert width >= 600 and height >= 360  # readable at MLflow's preview size


@pytest.mark.slow
def test_benchmark_grid_through_its_script(assets, tmp_path):
    from mlflow.tracking import MlflowClient

    ray_tmp = ray_tmpdir()
    sets = [arg for item in tiny_overrides(assets, tmp_path / "unused") for arg in ("--set", item)]
    args = ["--smoke", "--config", "voc", "--storage", str(tmp_path / "ray"), "--name", "grid", "--seeds", "2",
            "--archs", "segformer_tiny", "--scales", "2", "2,4", *sets]  # fmt: skip
    done = run_script("benchmark.py", args, tmp_path, private_ray_env(ray_tmp), timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| segformer_tiny | 2,4 | 2 |" in done.stdout
    assert "retrain it: accelerate launch -m clipzss.train ray/grid/best_config.yaml" in done.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clipzss").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`mlflow.runName` = 'benchmark grid'")
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"benchmark.json", "benchmark.md", "benchmark_hIoU.png", "best_config.yaml"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "benchmark.json", str(tmp_path))).read_text())
    table = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
    assert table["scales"] == ("2", "2,4") and table["seeds"] == (2, 2) and table["paired_seeds"] == (2, 2)
    assert all(v > 0 for v in table["GFLOPs"] + table["images_per_s"] + table["device_hours"])
    cells = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in cells) == ["segformer_tiny scales 2", "segformer_tiny scales 2,4"]
    for cell in cells:  # each cell a child run holding its seeds' runs
        assert cell.info.status == "FINISHED" and "hIoU_mean" in cell.data.metrics
        seeds = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{cell.info.run_id}'")
        assert len(seeds) == 2 and all(s.info.status == "FINISHED" for s in seeds)
        assert sorted(s.data.params["run.seed"] for s in seeds) == ["0", "1"]
    version = client.get_model_version_by_alias("clipzss-clipzss", "grid")  # the best cell's best seed, registered
    best_cell = parent.data.tags["clipzss.best_cell"].replace("/", " scales ")
    (cell,) = [c for c in cells if c.info.run_name == best_cell]
    seeds = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{cell.info.run_id}'")
    hiou = {s.info.run_id: s.data.metrics["val/hIoU"] for s in seeds}
    assert hiou[version.run_id] == max(hiou.values())
    assert_loads_as_student("models:/clipzss-clipzss@grid", client.tracking_uri)
