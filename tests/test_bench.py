"""``clipzss bench`` at smoke size: the figures are produced and the quality ones are sane (no timing asserted)."""

from clipzss.bench import bench_kmeans, run_benchmarks


def test_batched_kmeans_matches_sklearn_quality():
    figures = bench_kmeans(batch=2, grid=16, dim=64, scales=(4, 8), iters=10)
    assert 0.97 < figures["inertia_ratio"] < 1.03  # same seeds, same cap: the clusterings are as tight
    assert figures["kmeans_ms"] > 0 and figures["matmul_gflops"] > 0


def test_quick_bench_prints_all_three_figures(capsys):
    results = run_benchmarks(quick=True)
    out = capsys.readouterr().out
    assert "[1]" in out and "[2]" in out and "[3]" in out
    step = results["training_step"]
    assert step["clipzss_step_ms"] > 0 and step["ratio"] > 0
    assert {r["student"] for r in results["inference"]} == {"segformer_tiny"}
    assert results["inference"][0]["clip_gflops"] > results["inference"][0]["gflops"]
