"""Deterministic, resumable, rank-sharded training batches.

Every sample's augmentation is seeded by (run seed, epoch, index), so a batch depends only on the step it belongs
to: not on the worker that loaded it, and not on whether the run was interrupted and resumed. That is what makes
``--resume`` reproduce an uninterrupted run exactly.

The loader's worker processes ignore SIGTERM and SIGINT: a scheduler's stop (``kill -TERM -- -PGID``, Slurm,
systemd, Kubernetes) and a terminal's Ctrl-C reach the whole process group, and the main process alone decides how
the run stops (a checkpoint of the last step, then a true MLflow status). Workers still end with the main process.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SeededSamples(Dataset):
    """Item ``(epoch, i)`` is sample ``i`` with numpy/random seeded by (seed, epoch, i), in any process."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        np.random.seed(seed)
        random.seed(seed)
        return self.dataset[index]


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(epoch, index)`` keys for one rank, starting at micro-step ``start``.

    Each epoch is one permutation of the dataset drawn from (seed, epoch); global batch ``s`` is the slice
    ``[s * B * world, (s + 1) * B * world)`` of the concatenated epochs (incomplete tails dropped), and rank ``r``
    takes its ``r``-th sub-slice of ``B`` samples.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        global_batch = batch_size * world
        if size < global_batch:
            raise ValueError(f"the training set has {size} samples, fewer than one global batch ({global_batch})")
        self.size, self.batch_size, self.seed, self.rank, self.world, self.start = (
            size,
            batch_size,
            seed,
            rank,
            world,
            start,
        )
        self.per_epoch = size // global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            epoch, within = divmod(step, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator)
            offset = within * self.batch_size * self.world + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in order[offset : offset + self.batch_size]]
            step += 1


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: leave SIGTERM / SIGINT to the main process. PyTorch's worker handler dies on a SIGTERM
    that does not come from its parent, which a process-group signal never does, and the main process then fails
    on the lost worker instead of stopping cleanly. The worker's watchdog still ends it once the main process is
    gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_batches(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int, world: int, start: int
) -> Iterator[dict]:
    """Endless iterator over collated training batches for this rank, from micro-step ``start`` on."""
    sampler = StepBatches(len(dataset), batch_size, seed, rank, world, start)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededSamples(dataset, seed),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader's draws off the global RNG (resume)
    )
    return iter(loader)
