"""Real 2-process DDP (gloo, CPU) through the trainer's step: 2 processes x batch b equal 1 process x batch 2b.

The GLM's InfoNCE sees the gathered teacher CLS of both processes as negatives, DDP averages the gradients, and the
evaluation's confusion matrix is summed over the processes' shards: each must equal the one-process result.
"""

import math
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from step_fixtures import build_run, fixed_batch, micro_batches, one_step, step_config

from clipzss.data.datasets import build_dataset
from clipzss.engine.evaluate import evaluate

B = 2  # per process
GLM = {"glm.weight": 1.0, "data.batch_size": B}  # on top of the per-image NEL + CE


def _confusion(run, rank: int, world: int, reduce) -> torch.Tensor:
    """The evaluation's confusion matrix at the initial weights (identical on every process)."""
    cfg = run.cfg
    val_set = build_dataset(cfg.data, "val")
    text = run.teacher.encode_text(val_set.class_names)
    student = run.accelerator.unwrap_model(run.model).student
    metrics, _ = evaluate(student, val_set, text, cfg.loss.alpha, cfg.data, torch.device("cpu"), rank, world,
                          reduce=reduce, progress=False)  # fmt: skip
    return metrics["matrix"]


def _results(run, rank: int, world: int, reduce, images, labels) -> dict:
    matrix, shard = _confusion(run, rank, world, reduce), _confusion(run, rank, world, lambda t: t)
    mine = slice(rank * B, rank * B + len(images) // world)
    applied, means = one_step(run, micro_batches(images[mine], labels[mine], len(images) // world))
    bank = run.accelerator.unwrap_model(run.model).objective.glm.bank.clone()
    return {"matrix": matrix, "shard": shard, "applied": applied, "means": means, "bank": bank}


def _worker(rank: int, world: int, port: int, assets: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world  # real DDP, not a silent single process
    run = build_run(step_config(assets, Path(out) / "ddp", **GLM), accelerator)
    images, labels = fixed_batch(run.cfg, B * world, len(run.train_set.class_names))
    results = _results(run, rank, world, lambda t: accelerator.reduce(t, "sum"), images, labels)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(assets, tmp_path):
    from accelerate import Accelerator

    mp.spawn(_worker, args=(2, _free_port(), assets, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    run = build_run(step_config(assets, tmp_path / "one", **{**GLM, "data.batch_size": 2 * B}), Accelerator(cpu=True))
    images, labels = fixed_batch(run.cfg, 2 * B, len(run.train_set.class_names))
    one = _results(run, 0, 1, lambda t: t, images, labels)

    assert torch.equal(ranks[0]["shard"] + ranks[1]["shard"], one["matrix"])  # each process evaluated its part
    assert 0 < ranks[0]["shard"].sum() < one["matrix"].sum()
    assert torch.equal(ranks[0]["matrix"], one["matrix"]) and torch.equal(ranks[1]["matrix"], one["matrix"])
    assert set(one["means"]) == {"loss/glm", "loss/nel", "loss/ce", "loss/total"}
    for term, value in one["means"].items():  # each process's loss is its anchors' share of the 2b-batch loss
        shared = (ranks[0]["means"][term] + ranks[1]["means"][term]) / 2
        assert math.isclose(shared, value, rel_tol=1e-5), (term, shared, value)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in one["applied"].values()])))
    for name, g in one["applied"].items():
        assert torch.equal(ranks[0]["applied"][name], ranks[1]["applied"][name]), name  # DDP: one gradient
        # float32 sums in another order; q/k gradients are ~1e-10 at init (near-uniform attention): pure noise
        error = float(torch.linalg.vector_norm(ranks[0]["applied"][name] - g))
        assert error <= 1e-5 * float(torch.linalg.vector_norm(g)) + 1e-7 * norm, (name, error)
    torch.testing.assert_close(ranks[0]["bank"], one["bank"])  # both processes' teacher CLS entered the bank
