"""The benchmark table across student backbones x K-Means scale sets: a Ray Tune grid, every cell for N seeds,
every trial a real ``train()``; the MLflow parent run gets the table (mean ± std, params, GFLOPs, images/s,
device-hours, paired comparison against a reference cell), its markdown copy and an hIoU heatmap.

    python sweeps/benchmark.py [--config PRESET_OR_YAML] [--set k=v ...] [--archs a,b] [--scales 2 2,4]
        [--seeds N] [--reference ARCH/SCALES] [--max-concurrent N] [--cpus-per-trial N] [--gpus-per-trial N]
        [--storage ABS_PATH_OR_URI] [--name NAME] [--resume] [--address auto] [--max-failures N] [--smoke]
    ray submit cluster/cluster.yaml sweeps/benchmark.py -- --config voc --set data.root=... --address auto

It prints the table, the best cell and the command that retrains it. The library is ``clipzss.sweep`` (grid.py).
"""

from __future__ import annotations

import argparse
import sys

from clipzss.sweep.grid import run_benchmark
from clipzss.sweep.options import SweepOptions, add_common_arguments, common_options


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(prog="sweeps/benchmark.py", description=__doc__.split("\n\n")[0])
    add_common_arguments(p, "benchmark")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell, 0 .. N-1 (default 3)")
    p.add_argument("--reference", default="", help="ARCH/SCALES of the cell others are compared with (default: first)")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds {a.seeds}: needs at least 1")
    return common_options(a, seeds=a.seeds, reference=a.reference)


def main(argv: list[str] | None = None) -> int:
    run_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
