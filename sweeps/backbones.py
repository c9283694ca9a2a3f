"""Search student backbones and the method's [choice] knobs: Ray Tune + Optuna (TPE) + ASHA, every trial a real
``train()`` nested under one MLflow parent run (trials table, best config, Optuna's plots).

    python sweeps/backbones.py [--config PRESET_OR_YAML] [--set k=v ...] [--samples N] [--archs a,b]
        [--scales 4,8,16 8] [--grace-period N] [--max-concurrent N] [--cpus-per-trial N] [--gpus-per-trial N]
        [--storage ABS_PATH_OR_URI] [--name NAME] [--resume] [--address auto] [--max-failures N] [--smoke]
    ray submit cluster/cluster.yaml sweeps/backbones.py -- --config voc --set data.root=... --address auto

It prints the best config and the command that retrains it. The library is ``clipzss.sweep`` (see its search.py).
"""

from __future__ import annotations

import argparse
import sys

from clipzss.sweep.options import SweepOptions, add_common_arguments, common_options
from clipzss.sweep.search import run_search


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(prog="sweeps/backbones.py", description=__doc__.split("\n\n")[0])
    add_common_arguments(p, "backbones")
    p.add_argument("--samples", type=int, help="number of trials (default 16; 2 with --smoke)")
    p.add_argument("--grace-period", type=int, default=2, help="evaluations before ASHA may stop a trial")
    a = p.parse_args(argv)
    samples = a.samples if a.samples is not None else (2 if a.smoke else 16)
    return common_options(a, samples=samples, grace_period=a.grace_period)


def main(argv: list[str] | None = None) -> int:
    run_search(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
