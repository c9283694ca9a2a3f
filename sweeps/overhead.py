"""What the sweep layer costs: the same two trials trained directly and through the TPE + ASHA search, timed in one
run on this machine (a benchmark that prints its figures, not a test).

    python sweeps/overhead.py [--config synthetic] [--steps 200] [--workdir runs/overhead] [--set k=v ...]

It prints the wall times and the sweep's overhead over training the trials directly. The library is
``clipzss.sweep`` (overhead.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipzss.sweep.overhead import measure_overhead


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweeps/overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="synthetic", help="preset name or YAML file (default: synthetic)")
    p.add_argument("--steps", type=int, default=200, help="training steps per trial (default 200)")
    p.add_argument("--workdir", default="runs/overhead", help="where the runs go (default runs/overhead)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps {a.steps}: needs at least 1")
    measure_overhead(a.config, a.steps, a.set, Path(a.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
