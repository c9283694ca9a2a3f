"""``clipzss bench`` at smoke size: the figures are produced, sane, and logged to MLflow (no timing asserted)."""

import json
import logging

import pytest

from clipzss.bench import run_benchmarks
from clipzss.bench.kmeans import bench_kmeans
from clipzss.cli import main as cli


def test_batched_kmeans_matches_sklearn_and_faiss_quality():
    import torch

    figures = bench_kmeans(torch.device("cpu"), batch=2, grid=16, dim=64, scales=(4, 8), iters=10)
    for library in ("sklearn", "faiss"):  # same seeds, same cap: the clusterings are as tight
        assert 0.97 < figures[f"inertia_ratio_vs_{library}"] < 1.03, figures
    assert 0 < figures["fraction_of_peak"] and 0 < figures["assign_product_fraction_of_peak"]
    shares = [figures[f"step/{s}_share"] for s in ("assign_product", "argmax", "update")]  # one iteration's split
    assert all(0 < s < 1 for s in shares) and abs(sum(shares) - 1) < 1e-9
    assert figures["assign_product_flop_per_byte"] > 1 and figures["memory_gb_per_s"] > 0


def test_quick_bench_prints_and_logs_all_three_figures(tmp_path, capsys, caplog):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING):
        results = run_benchmarks(quick=True, device="cpu", tracking_uri=uri)
    assert "No pretrained weights" not in caplog.text  # random CLIP weights are the intent, not a failure
    out = capsys.readouterr().out
    assert "[1]" in out and "[2]" in out and "[3]" in out and "roofline" in out
    step = results["training_step"]
    assert step["clipzss_step_ms"] > 0 and step["ratio"] > 0
    assert all(v >= 0 for k, v in step.items() if k.startswith("share/")), step
    inference = results["inference"]
    forms = {r["form"]: r for r in inference["rows"]}
    assert {"torch eager fp32", "torch channels-last", "onnxruntime fp32", "onnxruntime int8 static"} <= set(forms)
    assert all(r["student"] == "segformer_tiny" and r["argmax_agreement"] > 0.9 for r in inference["rows"])
    assert forms["onnxruntime fp32"]["argmax_agreement"] >= 0.999  # the deployed graph is the torch model
    assert all(0 < r["min_ms"] <= r["ms"] <= r["max_ms"] for r in inference["rows"])
    assert all(k in out for k in ("onnxruntime int8 dynamic", "min", "max"))
    assert inference["clip_gflops"] > inference["rows"][0]["gflops"]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clipzss-bench").experiment_id])
    assert run.data.metrics["kmeans/kmeans_ms"] > 0 and "torch" in run.data.params
    table = json.loads(open(client.download_artifacts(run.info.run_id, "inference.json", str(tmp_path))).read())
    assert {"speedup_vs_eager_pipeline", "min_ms", "max_ms"} <= set(table["columns"]) and len(table["data"]) == len(
        forms
    )
    assert run.data.metrics["kmeans/kmeans_min_ms"] <= run.data.metrics["kmeans/kmeans_max_ms"]


def test_timings_are_interleaved_medians_of_five_after_warmup():
    import torch

    from clipzss.bench.timing import interleaved

    order = []
    t = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, torch.device("cpu"), repeat=5)
    assert order == ["a", "b"] + ["a", "b"] * 5  # one warm-up each, then rounds A B A B ...
    assert t["a"].repeats == 5 and t["a"].min_ms <= t["a"].median_ms <= t["a"].max_ms
    with pytest.raises(ValueError, match="at least 5"):
        interleaved({"a": lambda: None}, torch.device("cpu"), repeat=3)


def test_bench_cli_passes_its_options(monkeypatch):
    import clipzss.bench

    calls = []
    monkeypatch.setattr(clipzss.bench, "run_benchmarks", lambda *args: calls.append(args))
    assert cli(["bench", "--quick", "--device", "cpu", "--no-mlflow", "--no-compile", "--students", "a,b"]) == 0
    assert calls == [(True, "cpu", ("a", "b"), False, "", False)]
