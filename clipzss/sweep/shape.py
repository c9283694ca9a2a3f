"""A trial's shape: how many Ray Train workers it runs, what each holds, and how they are placed.

``--workers-per-trial`` is one number (every trial) or a per-backbone map with a default, for sweeps that mix
students of very different sizes: ``segformer_b0=1,swin_base=4,2`` gives SegFormer-B0 one worker, Swin-B four and
every other backbone two. One worker is a plain one-process trial (its resources may be a fraction of a GPU);
several workers are a Ray Train ``TorchTrainer`` inside the trial, each worker one Accelerate process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}  # --placement -> Ray's placement-group strategy
# What a multi-worker trial's own process holds while its workers train: it only relays results to Tune, so it
# holds memory but no CPU (Tune needs some resource; even 0.01 CPU would keep a 2 x 1-CPU worker group off a
# 2-CPU node).
DRIVER_RESOURCES = {"memory": 256 * 2**20}


@dataclass(frozen=True)
class TrialShape:
    """Workers per trial (by ``student.arch``, with a default), what each worker holds, and their placement."""

    default_workers: int = 1
    workers_by_arch: tuple[tuple[str, int], ...] = ()
    cpus_per_worker: float = 4.0
    gpus_per_worker: float = 1.0
    placement: str = "pack"

    def workers(self, sample: dict[str, Any]) -> int:
        """How many workers the trial of ``sample`` runs."""
        return dict(self.workers_by_arch).get(sample.get("student.arch", ""), self.default_workers)

    def devices(self, sample: dict[str, Any]) -> float:
        """Devices the trial holds (GPUs, or CPU processes when it runs on CPU): the unit of its device-hours."""
        return self.workers(sample) * (self.gpus_per_worker if self.gpus_per_worker > 0 else 1.0)

    def resources(self, sample: dict[str, Any]) -> dict[str, float]:
        """What Tune reserves for the trial itself. A multi-worker trial's workers are one Ray Train placement group
        (reserved whole, never half-placed), so the trial reserves only its relaying process."""
        if self.workers(sample) == 1:
            return {k: v for k, v in (("CPU", self.cpus_per_worker), ("GPU", self.gpus_per_worker)) if v > 0}
        return dict(DRIVER_RESOURCES)

    def spec(self) -> str:
        """The ``--workers-per-trial`` value this shape was parsed from."""
        return ",".join([*(f"{a}={n}" for a, n in self.workers_by_arch), str(self.default_workers)])


def parse_workers(spec: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """``"2"`` -> (2, ()); ``"segformer_b0=1,swin_base=4,2"`` -> (2, (("segformer_b0", 1), ("swin_base", 4))).

    Raises:
        ValueError: a count that is not a positive integer, or two defaults; the message names the item.
    """
    default, by_arch = None, []
    for item in (part.strip() for part in spec.split(",")):
        arch, sep, count = item.rpartition("=") if "=" in item else ("", "", item)
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--workers-per-trial {spec!r}: {item!r} is not a positive worker count")
        if not sep:
            if default is not None:
                raise ValueError(f"--workers-per-trial {spec!r}: two defaults ({default} and {n})")
            default = n
        else:
            by_arch.append((arch, n))
    return (1 if default is None else default), tuple(by_arch)


def check_shape(shape: TrialShape, archs: tuple[str, ...]) -> None:
    """Refuse shapes Ray would accept but that cannot mean what the user asked (named in the message)."""
    if shape.placement not in PLACEMENTS:
        raise ValueError(f"--placement {shape.placement!r}: choose one of {', '.join(PLACEMENTS)}")
    unknown = [arch for arch, _ in shape.workers_by_arch if arch not in archs]
    if unknown:
        raise ValueError(
            f"--workers-per-trial names {', '.join(unknown)}, not among the swept --archs {','.join(archs)}"
        )
    several = shape.default_workers > 1 or any(n > 1 for _, n in shape.workers_by_arch)
    if several and 0 < shape.gpus_per_worker < 1:
        raise ValueError(
            f"--gpus-per-worker {shape.gpus_per_worker}: a fraction of a GPU is for one-worker trials; "
            "a multi-worker trial's DDP workers each need a whole GPU (or 0 for CPU)"
        )
    if shape.gpus_per_worker > 1:
        raise ValueError(
            f"--gpus-per-worker {shape.gpus_per_worker}: one Accelerate process drives one GPU; "
            "use --workers-per-trial N for N GPUs per trial"
        )
