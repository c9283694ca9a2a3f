"""Printing the benchmark figures, and logging them as one MLflow run (metrics, params and tables)."""

from __future__ import annotations

import tempfile

INFERENCE_METRICS = ("ms", "min_ms", "max_ms", "argmax_agreement", "speedup_vs_eager_pipeline")

KMEANS_NOTE = (
    "    roofline: the assignment product has {assign_product_flop_per_byte:.0f} flop/byte against a machine "
    "balance of {machine_balance_flop_per_byte:.0f}, so it is {bound};\n"
    "    alone at its exact (skinny) shape it reaches {assign_product_gflop_per_s:.0f} GFLOP/s = "
    "{assign_product_fraction_of_peak:.0%} of square-matmul peak, and K-Means reaches {fraction_of_assign_product:.0%} "
    "of that ceiling.\n    One Lloyd iteration, each step alone: assignment product {step/assign_product_ms:.1f} ms "
    "({step/assign_product_share:.0%}), per-scale argmax {step/argmax_ms:.1f} ms ({step/argmax_share:.0%}), "
    "sparse update + renormalising {step/update_ms:.1f} ms ({step/update_share:.0%})."
)


def print_kmeans(figures: dict[str, float]) -> None:
    print("\n[1] multi-scale K-Means: batched torch vs per-image scikit-learn and faiss (same seeds and iteration cap)")
    for key, value in figures.items():
        print(f"    {key:34s} {value:12.3f}")
    bound = (
        "compute-bound (memory is not the limit)"
        if figures["assign_product_flop_per_byte"] > figures["machine_balance_flop_per_byte"]
        else "memory-bound"
    )
    print(KMEANS_NOTE.format_map({"bound": bound, **figures}))


def print_training_step(step: dict[str, float | str]) -> None:
    print(f"\n[2] training step, {step['student_arch']}, batch {step['batch']}, crop {step['crop']}, "
          f"{step['precision']}: CLIP-ZSS vs plain (parts: differences of medians of the same rounds)")  # fmt: skip
    for key, value in step.items():
        if isinstance(value, float) and not key.startswith("timed/"):
            print(f"    {key:36s} {value:10.3f}")
    print("    each call timed (median [min, max] ms):")
    for key in (k for k in step if k.startswith("timed/") and k.endswith("_min_ms")):
        name = key.removeprefix("timed/").removesuffix("_min_ms")
        print(f"    {name:36s} {step[f'timed/{name}_ms']:10.1f} [{step[key]:.1f}, {step[f'timed/{name}_max_ms']:.1f}]")


def print_inference(figures: dict, size: int) -> None:
    print(f"\n[3] inference at {size}x{size}, batch 1: the deployed student (20-class classifier baked in) vs the "
          f"same student + CLIP ViT-B/16\n    CLIP ViT-B/16 image tower (random weights: speed does not depend on "
          f"them): {figures['clip_params_M']:.1f} M params, {figures['clip_gflops']:.1f} GFLOPs")  # fmt: skip
    for arch, p in figures["profiles"].items():
        clip = ", ".join(
            f"{k} {v['ms']:.1f} ms [{v['min_ms']:.1f}, {v['max_ms']:.1f}]" for k, v in figures["clip_ms"][arch].items()
        )
        print(f"    {arch}: backbone {p['backbone_ms']:.1f} ms ({p['backbone_gflop_per_s']:.0f} GFLOP/s), "
              f"decode head {p['head_ms']:.1f} ms ({p['head_gflop_per_s']:.0f} GFLOP/s); CLIP: {clip}")  # fmt: skip
    print(f"    {'student':14s} {'form':33s} {'GFLOPs':>7s} {'ms':>8s} {'min':>8s} {'max':>8s} {'1st call s':>10s} "
          f"{'argmax=':>8s} {'x eager+CLIP':>12s} {'x best CLIP':>11s}")  # fmt: skip
    for r in figures["rows"]:
        print(f"    {r['student']:14s} {r['form']:33s} {r['gflops']:7.1f} {r['ms']:8.1f} {r['min_ms']:8.1f} "
              f"{r['max_ms']:8.1f} {r['first_call_s']:10.1f} {r['argmax_agreement']:8.2%} "
              f"{r['speedup_vs_eager_pipeline']:11.2f}x {r['speedup_vs_best_clip_pipeline']:10.2f}x")  # fmt: skip
    lightest = min(figures["rows"], key=lambda r: r["gflops"])["student"]
    hits = [r["form"] for r in figures["rows"] if r["student"] == lightest and r["speedup_vs_eager_pipeline"] >= 5]
    print(f"    >= 5x vs eager student + CLIP for the lightest student ({lightest}): {', '.join(hits) or 'no form'}")
    print(
        "    ms: median of the repeats, min and max beside it; x eager+CLIP: (eager student + eager CLIP) / this form;"
        " x best CLIP: (this form + CLIP in its fastest form) / this form,\n    all from medians of the same rounds."
        " Deployable without torch: onnxruntime (clipzss export ships the fastest variant at >= 99% agreement)."
    )


def log_to_mlflow(results: dict, params: dict[str, str], uri: str = "") -> str:
    """One run in the ``clipzss-bench`` experiment: flat metrics, the params, and the inference and K-Means tables."""
    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import Tracker

    with tempfile.TemporaryDirectory() as folder:  # holds only the run-id file: every bench is a new run
        tracker = Tracker(TrackingConfig(uri=uri, experiment="clipzss-bench"), folder, run_name=params["run_name"])
    tracker.log_params(params)
    metrics = {f"kmeans/{k}": v for k, v in results["kmeans"].items()}
    metrics |= {f"train_step/{k}": v for k, v in results["training_step"].items() if isinstance(v, float)}
    rows = results["inference"]["rows"]
    for r in rows:
        form = r["form"].split(" (")[0].replace(" ", "_").replace(".", "_")
        metrics |= {f"inference/{r['student']}/{form}/{k}": r[k] for k in INFERENCE_METRICS}
    tracker.log_metrics(metrics, step=0)
    tracker.log_table({k: [r[k] for r in rows] for k in rows[0]}, "inference.json")
    kmeans = results["kmeans"]
    tracker.log_table({"figure": list(kmeans), "value": list(kmeans.values())}, "kmeans.json")
    tracker.finish()
    return tracker.run_id


def print_segment_memory(figures: dict[str, float]) -> None:
    """``clipzss segment``'s peak memory on one image at the pixel cap (:func:`segment_peak_memory`)."""
    print(
        f"\nclipzss segment, one image of {figures['pixels'] / 1e6:.3g} MP (the --max-pixels cap): peak memory "
        f"{figures['peak_gb']:.2f} GB, {figures['loaded_gb']:.2f} GB of it the loaded segmenter "
        f"({figures['bytes_per_pixel']:.0f} bytes per pixel on top)"
    )
