"""The guarded collective helpers: single-process fallback and a real 2-process gloo gather."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipzss.distributed import gather_with_grad, world_info


def test_single_process_fallback():
    x = torch.randn(3, 4)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        assert world_info() == (rank, world)
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_with_grad(x)
        assert torch.equal(gathered, torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None].expand(4, 3))
        weights = torch.arange(12.0).view(4, 3)  # the same loss on every process
        (gathered * weights).sum().backward()
        # each slice's gradient is summed over the processes
        assert torch.equal(x.grad, world * weights[2 * rank : 2 * rank + 2])
    finally:
        dist.destroy_process_group()


def test_two_process_gather_keeps_local_autograd():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The assertions run inside both workers; spawn re-raises the first failure here.
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)
