"""What a multi-worker trial costs on this machine: ``accelerate launch --num_processes 2`` vs the same training as a
2-worker Ray Train trial of a one-trial search, and 2 one-worker trials vs 1 two-worker trial (a benchmark that
prints its figures and logs them to MLflow, not a test).

    python sweeps/workers_cost.py [--config synthetic] [--steps 1000] [--repeats 2] [--workdir runs/workers_cost]

The library is ``clipzss.sweep`` (workers_cost.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipzss.sweep.workers_cost import measure_worker_cost


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweeps/workers_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="synthetic", help="preset name or YAML file (default: synthetic)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per process (default 1000)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every run (default 2)")
    p.add_argument("--workdir", default="runs/workers_cost", help="where the runs go (default runs/workers_cost)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    a = p.parse_args(argv)
    if a.steps < 1 or a.repeats < 1:
        p.error(f"--steps {a.steps} --repeats {a.repeats}: each needs at least 1")
    measure_worker_cost(a.config, a.steps, a.repeats, a.set, Path(a.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
