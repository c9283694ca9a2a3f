"""A run folder copied elsewhere and resumed into another MLflow store, through ``clipzss train --resume``."""

import shutil
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from tiny_run import tiny_overrides

from clipzss.cli import main as cli_main
from clipzss.config import flatten, load_config
from clipzss.train import RESUMED_TAG


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_run_resumed_into_another_store_logs_its_full_config_and_its_past(assets, tmp_path, capsys):
    first, copy = tmp_path / "a" / "run", tmp_path / "b" / "run"
    store_a, store_b = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    overrides = tiny_overrides(assets, first, **{"tracking.log_images": False})
    assert cli_main(["train", *overrides]) == 0
    shutil.copytree(first, copy)
    resume = ["train", *tiny_overrides(assets, copy, **{"tracking.log_images": False, "tracking.uri": store_b}),
              "optim.max_iters=6", "--resume"]  # fmt: skip

    before = files(copy)  # the copy still names store A's run: store B refuses it, and nothing changes
    capsys.readouterr()
    assert cli_main(resume) == 1
    err = capsys.readouterr().err
    assert f"names MLflow run {(copy / 'mlflow_run_id').read_text()}, which the store '{store_b}' does not hold" in err
    assert files(copy) == before

    (copy / "mlflow_run_id").unlink()  # as a folder copied without it: a new MLflow run in store B
    assert cli_main(resume) == 0
    client = MlflowClient(tracking_uri=store_b)
    run = client.get_run((copy / "mlflow_run_id").read_text().strip())
    params, tags = run.data.params, run.data.tags
    config = flatten(load_config(None, overrides))
    assert run.info.status == "FINISHED" and set(config) <= set(params)  # what a fresh run logs
    assert params["tracking.uri"] == store_a and params["optim.max_iters"] == "4" and params["optim.lr"] == "0.001"
    assert params["tracking.uri.from_step_4"] == store_b and params["optim.max_iters.from_step_4"] == "6"
    assert params["run.output_dir.from_step_4"] == str(copy)
    assert tags[RESUMED_TAG] == (f"resumed at step 4 from a checkpoint of a run tracked in {store_a}; the metrics of "
                                 "steps 1-4 are copied from the run folder's journal")  # fmt: skip
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss/total")]
    assert steps == [1, 2, 3, 4, 5, 6]
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert saved["tracking"]["uri"] == store_b and saved["optim"]["max_iters"] == 6
