"""Timing helpers shared by the benchmark figures: median wall time, matmul roofline, parameter and FLOP counts."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


def timeit(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (synchronised on CUDA, so queued kernels are counted)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_gflops(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense square matmul throughput (the roofline the K-Means figure is compared with)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, device, repeat=5) / 1e9


def model_cost(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float]:
    """(parameters in millions, forward GFLOPs) of ``model`` on ``image``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9
