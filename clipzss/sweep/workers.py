"""A trial that spans GPUs and nodes: the trial's body is a Ray Train ``TorchTrainer`` whose N workers each run the
same ``train()`` as ``accelerate launch --num_processes N`` (Ray sets up the process group, Accelerate joins it).

Who does what:

- **Every worker** trains in the trial's folder path on its own node, starting from the highest-step checkpoint the
  trial ever reported (fetched from the trial's storage, local or s3://, by one worker per node), and reports at
  every evaluation through ``ray.train.report`` (all ranks, as Ray Train requires; only rank 0 passes a checkpoint,
  which Ray uploads into the trial's storage).
- **Rank 0 alone** writes the MLflow run (``train()`` tracks on the main process only) and relays its metrics to the
  trial's process over a :class:`TrialChannel`.
- **The trial's process** reports each result to Tune from its own thread (where Tune's scheduler can stop it) and
  answers every worker's "go on?" for that step. When ASHA stops the trial, every rank stops at that same step and
  rank 0 closes the run KILLED with the stopped-early tag before the trial's process ends
  (:class:`~clipzss.sweep.trainable.FinishesItsRunOnStop`); the workers end with it, as Ray ties actors to their
  owner.

A worker killed mid-trial makes Ray Train restart the worker group from the last reported checkpoint (``--max-failures``
times); the MLflow run continues and the spool commits each (metric, step) once.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from clipzss.config import Config, set_value
from clipzss.engine.checkpoint import MODEL_FILE, latest_checkpoint
from clipzss.sweep.shape import PLACEMENTS, TrialShape

RESULT_POLL_SECONDS = 1.0  # how long the trial's process waits for a result before checking its trainer is alive


class TrialChannel:
    """Results from rank 0 to the trial's process, and its verdict per evaluation step back to every rank (an async
    Ray actor: a rank waiting for a verdict does not block the trial's process from giving it)."""

    def __init__(self) -> None:
        self._results: asyncio.Queue = asyncio.Queue()
        self._verdicts: dict[int, bool] = {}  # step -> stop
        self._decided = asyncio.Condition()

    async def put(self, metrics: dict[str, float], final: bool) -> None:
        await self._results.put((metrics, final))

    async def next(self, timeout: float) -> tuple[dict[str, float], bool] | None:
        try:
            return await asyncio.wait_for(self._results.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def decide(self, step: int, stop: bool) -> None:
        async with self._decided:
            self._verdicts[step] = stop
            self._decided.notify_all()

    async def should_stop(self, step: int) -> bool:
        async with self._decided:
            await self._decided.wait_for(lambda: step in self._verdicts)
            return self._verdicts[step]


def run_worker_trial(cfg: Config, workers: int, shape: TrialShape, max_failures: int, measure_cost: bool) -> None:
    """The body of a multi-worker Tune trial (called by :func:`clipzss.sweep.trainable.run_trial`)."""
    import ray
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = tune.get_context().get_storage()
    channel = ray.remote(num_cpus=0)(TrialChannel).remote()
    gpus = shape.gpus_per_worker if cfg.run.device != "cpu" else 0.0
    if gpus == 0:  # workers without a GPU join Ray's gloo group only as Accelerate's CPU processes
        set_value(cfg, "run.device", "cpu")
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={
            "cfg": cfg,
            "channel": channel,
            "measure_cost": measure_cost,
            "storage": (storage.storage_filesystem, storage.trial_fs_path),
        },  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": shape.cpus_per_worker, "GPU": gpus},
            placement_strategy=PLACEMENTS[shape.placement],
        ),
        run_config=train.RunConfig(
            name="workers",
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            failure_config=train.FailureConfig(max_failures=max_failures),
            checkpoint_config=train.CheckpointConfig(num_to_keep=2),
        ),
    )
    outcome: dict[str, BaseException] = {}
    thread = threading.Thread(target=_fit, args=(trainer, outcome), name="clipzss-train-workers", daemon=True)
    thread.start()
    finals = _relay_results(channel, thread)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    for metrics in finals:  # after the run closed: ASHA's STOP for a result at max_t cannot cut it short
        tune.report(metrics)


def _fit(trainer, outcome: dict[str, BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as e:  # re-raised on the trial's thread, where Tune sees it
        outcome["error"] = e


def _relay_results(channel, thread: threading.Thread) -> list[dict[str, float]]:
    """Report rank 0's results to Tune until the trainer ends; returns the final results, held back."""
    import ray
    from ray import tune

    finals, last = [], -1
    while True:
        item = ray.get(channel.next.remote(RESULT_POLL_SECONDS))
        if item is None:
            if not thread.is_alive():
                return finals
            continue
        metrics, final = item
        if final:
            finals.append(metrics)
            continue
        step = int(metrics["step"])
        if step <= last:  # a restarted worker group reaching an evaluation Tune already has
            ray.get(channel.decide.remote(step, False))
            continue
        last = step
        try:
            tune.report(metrics)
        except SystemExit:  # the scheduler stopped the trial: every rank stops at this step, rank 0 closes the run
            ray.get(channel.decide.remote(step, True))
            thread.join()
            raise
        ray.get(channel.decide.remote(step, False))


def worker_main(loop: dict[str, Any]) -> None:
    """One Ray Train worker: fetch the trial's checkpoint, ``train()``, relay results (rank 0), stop when told."""
    import ray
    import torch.distributed as dist
    from ray import train

    from clipzss.sweep.trainable import fetch_latest_checkpoint, reattach_mlflow_run
    from clipzss.train import train as train_run

    cfg: Config = loop["cfg"]
    channel, context = loop["channel"], train.get_context()
    rank = context.get_world_rank()
    output_dir = Path(cfg.run.output_dir)
    if context.get_local_rank() == 0:  # one fetch per node: the others read the same folder
        fetch_latest_checkpoint(*loop["storage"], output_dir)
    nodes: list[str | None] = [None] * context.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())  # also: every fetch is done
    where = {"worker_nodes": ",".join(nodes)}  # Tune's results say where each rank ran
    resumable = latest_checkpoint(output_dir) is not None  # the same on every rank: one checkpoint, fetched first
    if rank == 0:
        reattach_mlflow_run(cfg, output_dir, resumable)
    final: list[tuple[dict[str, float], Path | None]] = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if metrics["step"] >= cfg.optim.max_iters:
            final.append((metrics, checkpoint))
            return
        _report_to_train(metrics, checkpoint)
        if rank == 0:
            ray.get(channel.put.remote({**metrics, **where}, False))
        if ray.get(channel.should_stop.remote(int(metrics["step"]))):
            raise SystemExit(0)  # what Tune raises in a one-process trial: train() closes the run KILLED, tagged

    try:
        train_run(cfg, report=report, resume=resumable, complete=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        return  # stopped by the scheduler: a clean end for Ray Train (no restart)
    for metrics, checkpoint in final:
        if loop["measure_cost"] and rank == 0:
            from clipzss.sweep.cost import student_cost
            from clipzss.sweep.trainable import trial_device

            metrics = {**metrics, **student_cost(output_dir / MODEL_FILE, trial_device(cfg))}
        _report_to_train(metrics, checkpoint)
        if rank == 0:
            ray.get(channel.put.remote({**metrics, **where}, True))


def _report_to_train(metrics: dict[str, float], checkpoint: Path | None) -> None:
    """``ray.train.report`` on every rank; only rank 0 has a checkpoint to pass."""
    from ray import train

    from clipzss.sweep.trainable import report_checkpoint_file

    report_checkpoint_file(train.report, train.Checkpoint, metrics, checkpoint)
