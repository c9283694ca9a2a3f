"""The CI-sized ablation benchmark: every arm trains on the synthetic world through the real entry point."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from clipzss.ablation import ARMS, METRICS, arm_slug, format_markdown, run_ablation, summarise
from clipzss.cli import main as cli


def test_summarise_mean_and_std_over_seeds():
    runs = {"a": [{f"val/{m}": v for m in METRICS} for v in (10.0, 20.0, 30.0)]}
    table = summarise(runs)
    assert table["arm"] == ["a"] and table["seeds"] == [3]
    assert table["hIoU_mean"] == [20.0]
    assert np.isclose(table["hIoU_std"][0], np.std([10, 20, 30]))
    assert "20.0 ± 8.2" in format_markdown(table)


def _parents(client: MlflowClient):
    experiment = client.get_experiment_by_name("clipzss").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.info.run_name.startswith("ablation:")]


def test_quick_ablation_in_parallel_logs_comparable_arms_and_a_new_parent_each_time(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.root={tmp_path / 'world'}",
        f"tracking.uri={uri}",
        f"teacher.cache_dir={tmp_path / 'text'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "run.progress=false",
    ]
    out = str(tmp_path / "ablation")
    table = run_ablation(seeds=1, output_root=out, quick=True, overrides=overrides, jobs=2)
    assert table["arm"] == list(ARMS)
    for metric in ("pAcc", "mIoU_S"):
        assert all(0 <= v <= 100 for v in table[f"{metric}_mean"])
    assert all(np.isfinite(table["mIoU_U_mean"]))  # every arm, the supervised one too, is scored on the same split
    rows = {arm: tuple(table[f"{m}_mean"][i] for m in METRICS) for i, arm in enumerate(table["arm"])}
    assert len(set(rows.values())) == len(ARMS), rows  # each arm trains its own objective, even at smoke size
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("\n") == 2 + len(ARMS)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the 2 jobs had: float sums depend on the thread count
    try:
        assert cli(["ablate", "--seeds", "1", "--out", out, "--quick", "--arms", "baseline,full", "--set",
                    *overrides]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    again = (tmp_path / "ablation" / "ablation.md").read_text().splitlines()[2:]
    first = format_markdown(table).splitlines()[2:]
    assert again == [first[0], first[3]]  # one at a time, the same numbers as 2 at a time in subprocesses

    client = MlflowClient(tracking_uri=uri)
    parents = _parents(client)
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]  # a second ablate never reuses the first
    assert parents[0].info.run_name == "ablation: 5 arms x 1 seed"
    params = parents[0].data.params
    assert params["seeds"] == "1" and params["steps"] == "4" and params["jobs"] == "2"
    assert params["arms"] == "[baseline, +GLM, +PLM, full, supervised]" and "data.batch_size=4" in params["overrides"]
    assert parents[1].data.params["arms"] == "[baseline, full]"
    means = parents[0].data.metrics  # the table as metrics: the runs table can sort arms by them
    assert means["full/val/hIoU_mean"] == pytest.approx(table["hIoU_mean"][3], abs=1e-3)
    assert {f"{arm_slug(arm)}/val/{m}_std" for arm in ARMS for m in METRICS} <= means.keys()
    assert "plus_GLM/val/hIoU_mean" in means
    best = max((v, a) for a, v in zip(table["arm"], table["hIoU_mean"], strict=True) if a != "supervised")
    assert parents[0].data.tags["mlflow.note.content"].startswith(f"**{best[1]}: hIoU {best[0]:.1f}")
    version = client.get_model_version_by_alias("clipzss-clipzss", "ablation")  # the latest ablation's best student
    assert version.tags["clipzss.ablation"] == parents[1].info.run_id and version.tags["clipzss.arm"] in (
        "baseline",
        "full",
    )
    assert parents[1].data.tags["clipzss.registered_model"] == "models:/clipzss-clipzss@ablation"
    children = client.search_runs(
        [parents[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert sorted(c.data.params["arm"] for c in children) == sorted(ARMS)
    assert all(c.info.status == "FINISHED" and "val/hIoU" in c.data.metrics for c in children)
    assert {c.info.run_name for c in children} == {f"{arm} seed=0" for arm in ARMS}
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert artifacts >= {"ablation.json", "ablation.md", "ablation.png"}
    logged = client.download_artifacts(parents[0].info.run_id, "ablation.json", str(tmp_path))
    assert "." not in "".join(json.loads(Path(logged).read_text())["columns"])  # dotted columns render blank


def test_a_failed_run_keeps_the_table_of_the_others_and_is_named(tmp_path, monkeypatch, capsys):
    """Seen for real: one of 6 parallel runs died at start and the whole ablation raised at the end, table unwritten."""
    import clipzss.ablation as ablation

    real_train_job = ablation.train_job

    def train_job(overrides, *args):
        if "run.seed=1" in overrides and "plm.enabled=false" in overrides:  # baseline, seed 1
            raise FileNotFoundError("weights.tmp vanished")
        return real_train_job(overrides, *args)

    monkeypatch.setattr(ablation, "train_job", train_job)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={tmp_path / 'world'}", f"tracking.uri={uri}", f"teacher.cache_dir={tmp_path / 'text'}"]
    overrides += ["data.batch_size=4", "data.num_workers=0", "run.progress=false"]
    out = str(tmp_path / "out")
    assert cli(["ablate", "--seeds", "2", "--out", out, "--quick", "--arms", "baseline,full", "--set", *overrides]) == 1
    err = capsys.readouterr().err
    assert "clipzss ablate: 1 of 4 runs failed: baseline seed 1 (FileNotFoundError: weights.tmp vanished)" in err
    assert "Traceback" in err  # the failed run's own traceback, printed when it failed
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert "| baseline | 1 |" in text and "| full | 2 |" in text  # the seeds that finished, counted honestly
    assert "failed: baseline seed 1 (FileNotFoundError: weights.tmp vanished)" in text
    client = MlflowClient(tracking_uri=uri)
    (parent,) = _parents(client)
    assert parent.info.status == "FAILED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.json", "ablation.md"}
