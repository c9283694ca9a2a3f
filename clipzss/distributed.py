"""The one guarded place for collectives: gather with autograd, and the process's rank / world size.

Both functions fall back to single-process behaviour when ``torch.distributed`` is not initialised, so the method
code that calls them runs unchanged in tests, notebooks and one-process training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not _initialised():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 from every process, keeping autograd through the local slice.

    Every process must pass the same shape. ``torch.distributed.nn.functional.all_gather`` sums the gradients of
    each slice over the processes on backward (as open_clip's ``gather_with_grad``), so with DDP's gradient averaging
    a loss computed on the gathered tensor trains exactly like the single-process loss on the whole batch.

    Args:
        x: [B, ...] the local batch.

    Returns:
        [world_size * B, ...] in rank order (this process's rows at ``rank * B``); ``x`` itself on one process.
    """
    if not _initialised() or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)
