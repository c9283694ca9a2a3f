"""What the sweep layer costs: the same trials through ``sweeps/backbones.py``'s search and trained directly.

The trials are the search's first points (one backbone, two scale sets, the preset's other values), each a real
``train()`` of ``steps`` steps on one CPU thread, two at a time. They are timed directly (spawned processes, as
``clipzss ablate --jobs 2``), then through the search (a private Ray, ``--max-concurrent 2 --cpus-per-trial 1``),
then directly again, so the two direct timings bound the machine's noise. The overhead is the sweep's wall time over
the mean direct one: Ray's start and scheduling, checkpoints copied to storage, the parent run and its plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from clipzss.ablation import train_job
from clipzss.config import load_config
from clipzss.sweep.options import SweepOptions
from clipzss.sweep.search import run_search
from clipzss.sweep.shape import TrialShape
from clipzss.sweep.space import first_points, sample_overrides, search_space
from clipzss.train import prepare_data_root

ARCH, SCALES = "segformer_tiny", ("2", "2,4")


def _direct(config: str, points: list[dict[str, Any]], fixed: list[str], folder: Path) -> float:
    """Wall seconds of training ``points`` two at a time in spawned processes (one CPU thread each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [[*fixed, *sample_overrides(p), f"run.output_dir={folder / f'trial{i}'}"] for i, p in enumerate(points)]
    start = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(train_job, overrides, 1, config) for overrides in jobs]:
            future.result()
    return time.perf_counter() - start


def measure_overhead(config: str, steps: int, overrides: list[str], workdir: Path) -> dict[str, float]:
    """Time the trials directly, through the search, directly again; print and return the figures."""
    workdir = workdir.resolve()
    fixed = [f"optim.max_iters={steps}", "run.progress=false", "tracking.log_images=false", *overrides]
    base = load_config(config, fixed)
    prepare_data_root(base)  # once, outside every timing
    points = first_points(search_space(base, (ARCH,), SCALES), base, (ARCH,), SCALES)

    first = _direct(config, points, fixed, workdir / "direct_1")
    opts = SweepOptions(config=config, overrides=fixed, archs=(ARCH,), scales=SCALES, samples=len(points),
                        max_concurrent=2, shape=TrialShape(cpus_per_worker=1.0, gpus_per_worker=0.0),
                        storage=str(workdir / "ray"),
                        name=f"overhead_{time.strftime('%Y%m%d_%H%M%S')}")  # fmt: skip
    start = time.perf_counter()
    run_search(opts)
    swept = time.perf_counter() - start
    second = _direct(config, points, fixed, workdir / "direct_2")

    direct = (first + second) / 2
    figures = {"direct_1_s": first, "direct_2_s": second, "sweep_s": swept, "overhead": swept / direct - 1,
               "direct_spread": abs(first - second) / direct}  # fmt: skip
    print(f"\n{len(points)} trials of {steps} steps ({ARCH}, scales {' and '.join(SCALES)}), 2 at a time, 1 CPU each")
    print("| run | wall s |\n|---|---|")
    print(f"| direct (1st) | {first:.1f} |\n| sweep (TPE + ASHA, private Ray) | {swept:.1f} |")
    print(f"| direct (2nd) | {second:.1f} |")
    print(f"sweep overhead: {100 * figures['overhead']:+.1f}% of the direct wall time "
          f"(the two direct timings differ by {100 * figures['direct_spread']:.1f}%)")  # fmt: skip
    return figures
