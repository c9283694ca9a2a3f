"""The CI-sized ablation benchmark: every arm trains on the synthetic world through the real entry point."""

import numpy as np
from mlflow.tracking import MlflowClient

from clipzss.ablation import ARMS, METRICS, format_markdown, run_ablation, summarise


def test_summarise_mean_and_std_over_seeds():
    runs = {"a": [{f"val/{m}": v for m in METRICS} for v in (10.0, 20.0, 30.0)]}
    table = summarise(runs)
    assert table["arm"] == ["a"] and table["seeds"] == [3]
    assert table["hIoU_mean"] == [20.0]
    assert np.isclose(table["hIoU_std"][0], np.std([10, 20, 30]))
    assert "20.0 ± 8.2" in format_markdown(table)


def test_quick_ablation_runs_every_arm_and_logs_the_table(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.root={tmp_path / 'world'}",
        f"tracking.uri={uri}",
        f"teacher.cache_dir={tmp_path / 'text'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "run.progress=false",
    ]
    table = run_ablation(seeds=1, output_root=str(tmp_path / "ablation"), quick=True, overrides=overrides)
    assert table["arm"] == list(ARMS)
    for metric in ("pAcc", "mIoU_S"):
        assert all(0 <= v <= 100 for v in table[f"{metric}_mean"])
    assert all(np.isfinite(table["mIoU_U_mean"]))  # every arm, the supervised one too, is scored on the same split
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("\n") == 2 + len(ARMS)
    client = MlflowClient(tracking_uri=uri)
    parent = [r for r in client.search_runs(client.get_experiment_by_name("clipzss").experiment_id)
              if r.info.run_name == "ablation"]  # fmt: skip
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs(
        [parent[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'"
    )
    assert len(children) == len(ARMS) and all(c.info.status == "FINISHED" for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert artifacts >= {"ablation.json", "ablation.md", "ablation.png"}
