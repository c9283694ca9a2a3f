"""What the command line of every sweep script sets: one :class:`SweepOptions`, the shared flags, smoke sizes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from clipzss.sweep.shape import PLACEMENTS, TrialShape, parse_workers
from clipzss.sweep.space import ARCHS, SCALES, SMOKE_ARCHS, SMOKE_SCALES

SMOKE_OVERRIDES = (
    "optim.max_iters=4",
    "optim.warmup_iters=1",
    "run.log_interval=2",
    "run.eval_interval=2",
    "run.checkpoint_interval=2",
    "data.max_eval_images=4",
    "data.num_workers=0",
    "run.device=cpu",
    "run.progress=false",
    "tracking.log_images=false",
)


@dataclass
class SweepOptions:
    """What the command line sets; ``run_search`` and ``run_benchmark`` take one of these."""

    config: str | None = "synthetic"  # preset name or YAML file; None = code defaults only
    overrides: list[str] = field(default_factory=list)  # fixed ``key=value`` for every trial
    max_concurrent: int = 4
    shape: TrialShape = field(default_factory=TrialShape)  # workers per trial, what each holds, placement
    storage: str = ""  # Ray's results: an absolute folder or a URI (s3://...); "" = <cwd>/runs/sweeps
    name: str = ""  # "" = <script>_<timestamp>; --resume needs the name of the sweep to continue
    resume: bool = False
    address: str = ""  # "auto" joins a running cluster (ray submit); "" starts a private Ray on this machine
    archs: tuple[str, ...] = ARCHS
    scales: tuple[str, ...] = SCALES
    max_failures: int = 1  # Ray restarts a failed trial this often, from its last reported checkpoint
    smoke: bool = False
    samples: int = 16  # TPE search: trials
    grace_period: int = 2  # TPE search: evaluations before ASHA may stop a trial
    seeds: int = 3  # benchmark grid: seeds per cell
    reference: str = ""  # benchmark grid: "arch/scales" of the cell others are compared with ("" = the first)
    register_as: str = ""  # registered MLflow model the best trial's student is added to ("" = clipzss-<experiment>)


def add_common_arguments(p: argparse.ArgumentParser, default_name: str) -> None:
    """The flags every sweep script shares (what runs, where results go, which Ray)."""
    p.add_argument("--config", default="synthetic", help="preset name or YAML file (default: synthetic)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override for every trial")
    p.add_argument("--archs", help=f"comma-separated student.arch values (default {','.join(ARCHS)})")
    p.add_argument("--scales", nargs="+", help=f"plm.kmeans.scales values (default {' '.join(SCALES)})")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 4; 2 with --smoke)")
    p.add_argument(
        "--workers-per-trial",
        default="1",
        metavar="N|ARCH=N,...,N",
        help="Ray Train workers (Accelerate processes) per trial: one number, or per student.arch with a default, "
        "e.g. segformer_b0=1,swin_base=4,2 (default 1: a plain one-process trial)",
    )
    p.add_argument("--cpus-per-worker", "--cpus-per-trial", type=float, help="default 4; 1 with --smoke")
    p.add_argument(
        "--gpus-per-worker",
        "--gpus-per-trial",
        type=float,
        help="0, a fraction (one-worker trials), or 1 (default 1; 0 with --smoke)",
    )
    p.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="pack",
        help="a trial's workers on as few nodes as possible (pack, default) or one per node where possible (spread)",
    )
    p.add_argument("--storage", default="", help="absolute folder or URI of Ray's results (default <cwd>/runs/sweeps)")
    p.add_argument("--name", default="", help=f"sweep name (default {default_name}_<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue sweep --name (give the same --config, --set)")
    p.add_argument("--address", default="", help="'auto' to join the running cluster (under `ray submit`)")
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial from its checkpoint")
    p.add_argument("--smoke", action="store_true", help="tiny CPU trials of a few steps: proves the whole path")
    p.add_argument(
        "--register-as",
        default="",
        help="MLflow registered model for the best student "
        "(default clipzss-<experiment>; one version per sweep, aliased with the sweep name)",
    )


def common_options(a: argparse.Namespace, **extra) -> SweepOptions:
    """A :class:`SweepOptions` from parsed common flags (smoke defaults where a flag was not given) plus ``extra``."""
    smoke = a.smoke

    def pick(value, default, smoke_default):
        return value if value is not None else (smoke_default if smoke else default)

    return SweepOptions(
        config=a.config,
        overrides=a.set,
        max_concurrent=pick(a.max_concurrent, 4, 2),
        shape=TrialShape(
            *parse_workers(a.workers_per_trial),
            cpus_per_worker=pick(a.cpus_per_worker, 4.0, 1.0),
            gpus_per_worker=pick(a.gpus_per_worker, 1.0, 0.0),
            placement=a.placement,
        ),
        storage=a.storage,
        name=a.name,
        resume=a.resume,
        address=a.address,
        archs=tuple(a.archs.split(",")) if a.archs else (SMOKE_ARCHS if smoke else ARCHS),
        scales=tuple(a.scales) if a.scales else (SMOKE_SCALES if smoke else SCALES),
        max_failures=a.max_failures,
        smoke=smoke,
        register_as=a.register_as,
        **extra,
    )
