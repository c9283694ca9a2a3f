"""Timing helpers shared by the benchmark figures: interleaved repeats, matmul roofline, parameter and FLOP counts.

Every timing is the median of at least ``MIN_REPEATS`` calls after warm-up (the statistic torch.utils.benchmark
reports), kept with its min and max. Calls that a figure compares are timed in rounds (A B C, A B C, ...): a load
spike on a shared machine then hits every side of a ratio, and ratios are taken between medians of the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

MIN_REPEATS = 5


@dataclass(frozen=True)
class Timing:
    """Wall times of one call over its repeats, in ms."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def columns(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}ms`` (the median), ``{prefix}min_ms``, ``{prefix}max_ms``: the columns every table carries."""
        return {f"{prefix}ms": self.median_ms, f"{prefix}min_ms": self.min_ms, f"{prefix}max_ms": self.max_ms}

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ms [{self.min_ms:.1f}, {self.max_ms:.1f}]"


def interleaved(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeat: int = MIN_REPEATS, warmup: int = 1
) -> dict[str, Timing]:
    """Warm every call up, then time them in ``repeat`` interleaved rounds; name -> :class:`Timing`.

    Synchronised on CUDA, so queued kernels are counted. Raises ValueError under ``MIN_REPEATS`` repeats.
    """
    if repeat < MIN_REPEATS:
        raise ValueError(f"interleaved: {repeat} repeats; a median needs at least {MIN_REPEATS}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(float(np.median(t)), min(t), max(t), len(t)) for name, t in times.items()}


def timeit(fn: Callable[[], object], device: torch.device, repeat: int = MIN_REPEATS, warmup: int = 1) -> float:
    """Median wall time of ``fn`` alone, in seconds (for a figure that compares it with nothing)."""
    return interleaved({"call": fn}, device, repeat, warmup)["call"].median_ms / 1e3


def matmul_call(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32) -> tuple[Callable, float]:
    """(a dense square matmul call, its flops): the roofline's peak, timed among the calls it is compared with."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2.0 * n**3


def model_cost(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float]:
    """(parameters in millions, forward GFLOPs) of ``model`` on ``image``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9
