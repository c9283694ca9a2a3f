"""Properties of ``StepBatches``, which exact resume and DDP rest on: ranks take disjoint slices of one global batch,
each epoch is one permutation, ``start=k`` is the stream with its first k batches skipped."""

from itertools import islice

import pytest

from clipzss.engine.loader import StepBatches

# (dataset size, batch per rank, world, seed): divisible and not, one rank and several
CASES = [(12, 2, 1, 0), (13, 2, 2, 1), (10, 3, 3, 7), (40, 4, 2, 3), (7, 7, 1, 5)]


def _steps(size: int, batch: int, world: int, seed: int, rank: int, steps: int, start: int = 0) -> list[list]:
    return list(islice(iter(StepBatches(size, batch, seed, rank, world, start)), steps))


@pytest.mark.parametrize(("size", "batch", "world", "seed"), CASES)
def test_ranks_split_one_global_batch_that_does_not_depend_on_the_world_size(size, batch, world, seed):
    steps = 3 * (size // (batch * world)) + 1  # into a fourth epoch
    per_rank = [_steps(size, batch, world, seed, r, steps) for r in range(world)]
    alone = _steps(size, batch * world, 1, seed, 0, steps)  # one process with the global batch
    for s in range(steps):
        parts = [per_rank[r][s] for r in range(world)]
        assert all(len(p) == batch for p in parts)
        assert len(set().union(*map(set, parts))) == batch * world  # disjoint
        assert [key for p in parts for key in p] == alone[s]  # rank r holds the r-th slice of the same batch


@pytest.mark.parametrize(("size", "batch", "world", "seed"), CASES)
def test_each_epoch_is_one_permutation_without_repeats(size, batch, world, seed):
    per_epoch = size // (batch * world)
    keys = [key for r in range(world) for step in _steps(size, batch, world, seed, r, 3 * per_epoch) for key in step]
    epochs = {}
    for epoch, index in keys:
        epochs.setdefault(epoch, []).append(index)
    assert sorted(epochs) == [0, 1, 2]
    for indices in epochs.values():
        assert len(indices) == len(set(indices)) == per_epoch * batch * world  # no sample twice; the tail dropped
        assert all(0 <= i < size for i in indices)
    orders = [tuple(_steps(size, batch * world, 1, seed, 0, 3 * per_epoch)[e * per_epoch]) for e in range(3)]
    if size > batch * world:  # a new order each epoch (with room for more than one)
        assert len({tuple(i for _, i in order) for order in orders}) > 1


@pytest.mark.parametrize(("size", "batch", "world", "seed"), CASES)
@pytest.mark.parametrize("start", [0, 1, 5, 11])
def test_starting_at_k_equals_skipping_k_batches(size, batch, world, seed, start):
    for rank in range(world):
        assert (
            _steps(size, batch, world, seed, rank, 6, start)
            == _steps(size, batch, world, seed, rank, start + 6)[start:]
        )


def test_seeds_give_different_streams_and_the_same_seed_the_same():
    assert _steps(40, 4, 1, 0, 0, 5) == _steps(40, 4, 1, 0, 0, 5)
    assert _steps(40, 4, 1, 0, 0, 5) != _steps(40, 4, 1, 1, 0, 5)


def test_a_dataset_smaller_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(5, 3, 0, 0, 2)
