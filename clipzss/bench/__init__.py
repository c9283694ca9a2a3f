"""``clipzss bench`` / ``python -m clipzss.bench``: the speed figures, measured in one run on this machine.

1. Batched multi-scale K-Means vs scikit-learn and faiss per image (same seeds, same iteration cap), and its place
   on this machine's roofline (``kmeans.py``).
2. One CLIP-ZSS training step vs the same student with plain seen-class losses, and each part's share
   (``training.py``; bf16 autocast on a GPU).
3. Inference: the deployed student in every form that holds (eager, channels-last, bf16, torch.compile, the
   exported ONNX graph in onnxruntime) vs the same student + a CLIP ViT-B/16 image forward (``inference.py``),
   and ``clipzss segment``'s peak memory on one image at its pixel cap.

Every timing is the median of at least 5 repeats after warm-up, printed with its min and max; the calls a ratio
compares are timed in the same interleaved rounds (``timing.py``). Ratios are the figures to compare across
machines; absolute times are printed too (and matter on a GPU). The
figures are logged as one MLflow run (``report.py``) unless ``--no-mlflow``; without MLflow, open_clip (the CLIP
architecture) is the only dependency beyond torch, timm, transformers and einops (faiss, scikit-learn and
onnxruntime columns are skipped when those are not installed).
"""

from __future__ import annotations

import argparse

FULL_STUDENTS = ("segformer_b0", "resnet50", "swin_tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke sizes (64 px, tiny students): checks the mechanics")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--students", default=",".join(FULL_STUDENTS), help="comma-separated student archs")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile form (slow first call)")
    parser.add_argument("--no-mlflow", action="store_true", help="print only (no MLflow run)")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: sqlite:///./mlflow.db)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run with the options of :func:`add_arguments` (``clipzss bench`` and ``python -m clipzss.bench``)."""
    students = tuple(args.students.split(","))
    run_benchmarks(args.quick, args.device, students, not args.no_mlflow, args.tracking_uri, not args.no_compile)
    return 0


def run_benchmarks(
    quick: bool = False,
    device: str = "auto",
    students: tuple[str, ...] = FULL_STUDENTS,
    mlflow: bool = True,
    tracking_uri: str = "",
    compile: bool = True,
) -> dict[str, object]:
    """Run the three figures, print them, log them to MLflow; ``quick`` shrinks sizes for a smoke run.

    ``compile``: include the torch.compile inference form (not in a quick run: compiling takes minutes on a CPU).
    """
    import torch

    from clipzss.bench.inference import bench_inference, segment_peak_memory
    from clipzss.bench.kmeans import bench_kmeans
    from clipzss.bench.report import (
        log_to_mlflow,
        print_inference,
        print_kmeans,
        print_segment_memory,
        print_training_step,
    )
    from clipzss.bench.training import bench_training_step
    from clipzss.data.images import DEFAULT_MAX_PIXELS

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"clipzss bench on {name}, torch {torch.__version__}")
    kmeans = bench_kmeans(dev, batch=2, grid=16, dim=64, iters=3) if quick else bench_kmeans(dev)
    print_kmeans(kmeans)
    if quick:
        step = bench_training_step(dev, batch=1, crop=64, arch="segformer_tiny")
    else:
        step = bench_training_step(dev)
    print_training_step(step)
    size = 64 if quick else 512
    archs = ("segformer_tiny",) if quick else students
    inference = bench_inference(archs, dev, size=size, compile=compile and not quick)
    print_inference(inference, size)
    memory = segment_peak_memory(100_000 if quick else DEFAULT_MAX_PIXELS)
    print_segment_memory(memory)
    results = {"kmeans": kmeans, "training_step": step, "inference": inference, "segment_memory": memory}
    if mlflow:
        params = {"run_name": f"bench {'quick ' if quick else ''}{name}", "device": name, "torch": torch.__version__,
                  "quick": str(quick), "students": ",".join(students)}  # fmt: skip
        print(f"\nlogged as MLflow run {log_to_mlflow(results, params, tracking_uri)} (experiment clipzss-bench)")
    return results
