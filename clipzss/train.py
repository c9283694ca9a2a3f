"""The CLIP-ZSS trainer.

    accelerate launch clipzss/train.py [CONFIG.yaml | PRESET] [section.key=value ...] [--resume]

With no CONFIG the offline ``synthetic`` preset runs. :func:`train` is the importable entry point that this CLI,
the tests and the Ray Tune trainable in ``sweeps/`` all call.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from clipzss.cli_errors import DEBUG_FLAG, DEBUG_HELP, run_reporting_errors
from clipzss.config import Config, check_values, flatten, from_dict, load_config, save_config, to_dict
from clipzss.data.datasets import build_dataset
from clipzss.engine.checkpoint import (
    MODEL_FILE,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from clipzss.engine.evaluate import evaluate
from clipzss.engine.loader import training_batches
from clipzss.engine.plm_diagnostics import plm_diagnostics
from clipzss.engine.resume import apply_optimizer_settings, resume_changes
from clipzss.engine.run_lock import run_dir_lock
from clipzss.engine.spool import JOURNAL, Spool, pending_records, read_journal, set_aside
from clipzss.engine.stop import RunTerminated, StopRequest
from clipzss.engine.tracking import (
    HEADLINE,
    RUN_ID_FILE,
    VIEW_KEY,
    NullTracker,
    Tracker,
    eval_metrics,
    log_datasets,
    param_value,
    quick_http,
    run_description,
    run_name,
)
from clipzss.engine.visualize import confusion_picture, plm_panel, prediction_panel
from clipzss.method.objective import CLIPZSSObjective
from clipzss.metrics import format_table
from clipzss.models.students import build_student
from clipzss.models.teacher import CLIPTeacher
from clipzss.paths import resolve_path

Report = Callable[[dict[str, float], Path | None], None]


STOPPED_EARLY_TAG = "clipzss.stopped_early"  # set when a scheduler (Ray Tune) ends the run: "stopped early at step N"
FAILURE_TAG = "clipzss.failure"  # why a FAILED run failed: "<error type>: <message>"
RESUMED_TAG = "clipzss.resumed_from"  # a resume into a new MLflow run: the step, the store of its past


class ResumeError(RuntimeError):
    """``--resume`` has nothing to continue; the message names the folder."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step, the terms and the last good checkpoint."""


class TrainModule(nn.Module):
    """Student + objective: everything trainable, and the only module given to ``accelerator.prepare``."""

    def __init__(self, student: nn.Module, objective: CLIPZSSObjective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, images: Tensor, labels: Tensor, teacher_out) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.objective(self.student(images), teacher_out, labels)


def build_optimizer(model: TrainModule, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the backbone at ``lr`` and everything else (decode head, projection, synthesizer) at ``lr * mult``;
    no weight decay on norms and biases."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
    backbone = {id(p) for p in model.student.backbone.parameters()}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in backbone, p.ndim <= 1)].append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": o.lr if is_backbone else o.lr * o.head_lr_mult,
                "weight_decay": 0.0 if no_decay else o.weight_decay,
            }
            for (is_backbone, no_decay), params in sorted(groups.items())
        ]
    )


def poly_with_warmup(cfg: Config) -> Callable[[int], float]:
    """LR factor at optimiser step ``s``: linear warm-up from 1e-6, then (1 - s / max_iters) ** power."""
    o = cfg.optim

    def factor(step: int) -> float:
        poly = (1 - min(step, o.max_iters) / o.max_iters) ** o.poly_power
        if step < o.warmup_iters:
            return poly * (1e-6 + (1 - 1e-6) * step / o.warmup_iters)
        return poly

    return factor


def prepare_data_root(cfg: Config) -> None:
    """The synthetic world is generated on first use; real datasets must already be prepared."""
    if cfg.data.dataset == "synthetic":
        from clipzss.data.synthetic import materialize_world

        materialize_world(resolve_path(cfg.data.root))


def _fresh_sibling(output_dir: Path) -> Path:
    """``<dir>_2``, ``<dir>_3``, ...: the first sibling without checkpoints (the same on every process)."""
    n = 2
    while latest_checkpoint(output_dir.with_name(f"{output_dir.name}_{n}")) is not None:
        n += 1
    return output_dir.with_name(f"{output_dir.name}_{n}")


def _check_finite(nonfinite: Tensor, step: int, losses: dict[str, Tensor], output_dir: Path) -> None:
    if int(nonfinite.item()) == 0:
        return
    last = latest_checkpoint(output_dir)
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"non-finite loss by step {step} (last terms: {terms}); training stopped. "
        f"Last good checkpoint: {last or 'none yet'}. Try a lower optim.lr, optim.grad_clip > 0, or bf16 "
        "instead of fp16; resume with --resume."
    )


def _save_picture(picture: np.ndarray, path: Path, tracker, key: str, step: int) -> None:
    """Write ``path`` (the run folder keeps every picture) and log it to MLflow as image ``key`` at ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    tracker.log_image(key, picture, step)


@dataclass
class RunState:
    """Everything the training loop reads, and the step it advances."""

    cfg: Config
    accelerator: Any
    teacher: CLIPTeacher
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: Any
    val_set: Any
    eval_text: Tensor
    tracker: Any
    output_dir: Path
    report: Report | None
    stop: StopRequest
    step: int = 0
    last_eval: dict = field(default_factory=dict)  # the latest evaluate() metrics (with the confusion matrix)


def train(cfg: Config, report: Report | None = None, resume: bool = False, complete: bool = False) -> dict[str, float]:
    """Train a CLIP-ZSS student as configured; returns the final ``val/...`` metrics.

    Args:
        cfg: the resolved configuration.
        report: called after every evaluation with the flat metrics and the checkpoint just written (Ray Tune).
        resume: continue from the latest checkpoint in ``cfg.run.output_dir`` (exactly: same data, same RNG).
        complete: with ``resume``, a checkpoint that already reached ``optim.max_iters`` is evaluated again and the
            run's outputs are written (model.pt, results, MLflow FINISHED) instead of refused: a scheduler retrying
            a trial that failed after its last checkpoint gets its final result.

    Raises:
        RunTerminated: SIGTERM arrived; a checkpoint of the last step was written and MLflow says KILLED.
        RunDirBusyError: another process is training in ``run.output_dir``.
    """
    from accelerate import Accelerator

    check_values(cfg)
    # no gradient_accumulation_steps: _train_step accumulates itself (Accelerate's would divide the loss again)
    accelerator = Accelerator(mixed_precision=cfg.optim.mixed_precision, cpu=cfg.run.device == "cpu")
    cfg, output_dir, checkpoint = _choose_run_dir(cfg, resume, accelerator)
    with run_dir_lock(output_dir) if accelerator.is_main_process else nullcontext(), StopRequest() as stop:
        return _train_in(cfg, accelerator, output_dir, checkpoint, report, stop, complete)


def _choose_run_dir(cfg: Config, resume: bool, accelerator) -> tuple[Config, Path, Path | None]:
    """The config, the run folder (never overwrite a run: a fresh start beside one goes to ``<dir>_2``) and the
    checkpoint to resume."""
    output_dir = Path(resolve_path(cfg.run.output_dir))
    checkpoint = latest_checkpoint(output_dir)
    if resume and checkpoint is None:
        raise ResumeError(
            f"--resume: nothing to resume in {output_dir} (no checkpoints/step_*.pt there). "
            "Check run.output_dir, or drop --resume to start a new run."
        )
    if checkpoint is not None and not resume:
        taken, output_dir = output_dir, _fresh_sibling(output_dir)
        cfg = copy.deepcopy(cfg)
        cfg.run.output_dir = str(output_dir)
        checkpoint = None
        accelerator.print(
            f"{taken} already holds a run (pass --resume to continue it); this one writes to {output_dir}"
        )
    return cfg, output_dir, checkpoint


def _train_in(cfg: Config, accelerator, output_dir: Path, checkpoint: Path | None, report: Report | None,
              stop: StopRequest, complete: bool):  # fmt: skip
    """Build everything, restore ``checkpoint`` if any, and run the loop with tracking (inside the run-dir lock)."""
    from accelerate.utils import set_seed

    device = accelerator.device
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    changes = resume_changes(state["config"], cfg) if state is not None else {}
    if state is not None and state["step"] >= cfg.optim.max_iters and not complete:
        raise ResumeError(
            f"--resume: {checkpoint} already reached optim.max_iters={cfg.optim.max_iters}; "
            f"pass optim.max_iters=N (N > {state['step']}) to train further."
        )
    set_seed(cfg.run.seed)
    with accelerator.main_process_first():
        prepare_data_root(cfg)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(
        cfg.data,
        "val",
        dataset=cfg.data.eval_dataset or None,
        root=cfg.data.eval_root or None,
        split=cfg.data.eval_split or (None if cfg.data.eval_dataset else cfg.data.split),
    )
    teacher = CLIPTeacher(cfg.teacher).to(device)
    seen_text = teacher.encode_text(train_set.class_names).to(device)
    eval_text = teacher.encode_text(val_set.class_names).to(device)
    student = build_student(cfg.student, teacher.embed_dim)
    model = TrainModule(student, CLIPZSSObjective(cfg, seen_text)).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_with_warmup(cfg))
    start = 0
    if state is not None:
        fresh = [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, fresh)
        set_rng_state(state["rng"])
        start = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    # The scheduler is stepped by hand once per optimiser step (a prepared one steps once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    tracker = NullTracker()
    if accelerator.is_main_process:
        if cfg.tracking.enabled:
            new_run = state is None or not (output_dir / RUN_ID_FILE).is_file()
            saved = state["config"] if state is not None else None
            tracker = _open_tracking(cfg, output_dir, saved, changes, start)
            log_datasets(tracker, cfg, train_set, val_set)
            if new_run:
                tracker.log_params(batch_params(cfg, accelerator.num_processes))
        save_config(cfg, output_dir / "config.yaml")  # once tracking has opened: a refused resume changes nothing
    run = RunState(cfg, accelerator, teacher, model, optimizer, scheduler, train_set, val_set, eval_text, tracker,
                   output_dir, report, stop, start)  # fmt: skip
    try:
        final = _loop(run)
    except BaseException as e:
        _end_tracking(run, e)
        raise
    finally:
        if isinstance(tracker, Spool):
            tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def batch_params(cfg: Config, world_size: int) -> dict[str, str]:
    """The shape of one optimiser step, logged beside the config: trial shapes (1 GPU, 4 GPUs, 2 nodes) differ here."""
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world_size
    return {"run.world_size": str(world_size), "data.per_process_batch": str(cfg.data.batch_size),
            "data.global_batch": str(global_batch)}  # fmt: skip


def _open_tracking(cfg: Config, output_dir: Path, saved: dict | None, changes: dict, start: int) -> Spool:
    """The MLflow run of this folder behind a spool (``saved``: the config of the checkpoint resumed, if any).

    A fresh run always gets a new MLflow run. A resume continues the MLflow run whose id the folder holds; without
    one (a moved or copied folder, another store) it gets a new MLflow run holding what a fresh run logs (the config
    the checkpoint trained with), the resume's changes as ``<key>.from_step_<N>``, the tag :data:`RESUMED_TAG` and
    the metrics of steps 1..N that the folder's journal still holds. The folder's files change only once the store
    has opened the run, so a refused resume leaves them as they were.
    """
    id_file = output_dir / RUN_ID_FILE
    continuing = saved is not None and id_file.is_file()
    earlier = _journalled_metrics(output_dir, start) if saved is not None and not continuing else []
    if saved is None:  # a re-run in a folder without checkpoints must not inherit the old run's params
        id_file.unlink(missing_ok=True)
    tags = {"clipzss.dataset": cfg.data.dataset}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    if saved is not None and not continuing:
        tags[RESUMED_TAG] = _resume_facts(saved, start, bool(earlier))
    tracker = Tracker(cfg.tracking, output_dir, run_name(cfg), tags, run_description(cfg))
    if not continuing:
        kept = set_aside(output_dir)
        if kept is not None:
            print(f"undelivered tracking records of the previous run in {output_dir} were kept in {kept}")
    spool = Spool(tracker, output_dir, quiet_http=quick_http, continuing=continuing)
    if not continuing:
        spool.log_params({k: param_value(v) for k, v in flatten(cfg if saved is None else from_dict(saved)).items()})
    if saved is not None:  # MLflow never changes a logged param: a resume override is logged under its own name
        spool.log_params({f"{k}.from_step_{start}": str(new) for k, (_, new) in changes.items()})
    for record in earlier:
        spool.log_metrics(*record["args"], timestamp_ms=record["kwargs"].get("timestamp_ms"))
    spool.log_dict(to_dict(cfg), "config.yaml")
    return spool


def _journalled_metrics(output_dir: Path, last: int) -> list[dict]:
    """The folder's journalled ``log_metrics`` records of steps up to ``last`` (the steps a resume does not redo)."""
    records = read_journal(output_dir / JOURNAL)
    return [r for r in records if r["op"] == "log_metrics" and r["args"][1] <= last]


def _resume_facts(saved: dict, start: int, replayed: bool) -> str:
    """The :data:`RESUMED_TAG` of a resume into a new MLflow run: where it started, and where its past is."""
    before = saved["tracking"]["uri"] or "the default store"
    past = (f"the metrics of steps 1-{start} are copied from the run folder's journal" if replayed
            else f"the metrics of steps 1-{start} are not in this run")  # fmt: skip
    return f"resumed at step {start} from a checkpoint of a run tracked in {before}; {past}"


def _end_tracking(run: RunState, error: BaseException) -> None:
    """Give the MLflow run a true status: KILLED for SIGTERM, Ctrl-C and a scheduler's stop, else FAILED with the
    error in the tag :data:`FAILURE_TAG`."""
    stopped_early = isinstance(error, SystemExit) and error.code in (0, None)  # Ray Tune ending a trial
    if stopped_early:
        run.tracker.set_tags({STOPPED_EARLY_TAG: f"stopped early at step {run.step}"})
    killed = stopped_early or isinstance(error, (KeyboardInterrupt, RunTerminated))
    if not killed:
        run.tracker.set_tags({FAILURE_TAG: f"{type(error).__name__}: {error}"[:2000]})
    run.tracker.finish("KILLED" if killed else "FAILED")


def _at(step: int, interval: int, last: int) -> bool:
    return (interval > 0 and step % interval == 0) or step == last


def _loop(run: RunState) -> dict[str, float]:
    """The training loop proper, from ``run.step`` to ``optim.max_iters``; returns the last val metrics."""
    cfg, accelerator, o = run.cfg, run.accelerator, run.cfg.optim
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = training_batches(
        run.train_set, cfg.data.batch_size, cfg.run.seed, cfg.data.num_workers, rank, world, run.step * o.grad_accum
    )
    sums = _Sums(accelerator.device)
    progress = _progress(cfg, run.step, accelerator.is_main_process)
    final: dict[str, float] = {}
    run.model.train()
    while run.step < o.max_iters:
        losses, batch = _train_step(run, batches, sums)
        progress.update(1)
        if _at(run.step, cfg.run.log_interval, o.max_iters):
            logged = _log_train(run, sums, losses)
            progress.set_postfix(loss=f"{logged['train/loss/total']:.3f}")
        checkpointed = _at(run.step, cfg.run.checkpoint_interval, o.max_iters)
        saved = _checkpoint(run, sums, losses) if checkpointed else None
        if _at(run.step, cfg.run.eval_interval, o.max_iters):
            final = _evaluate(run, batch)
            if run.report is not None:
                run.report(final, saved)
        if _stop_requested(run):
            saved = saved if checkpointed else _checkpoint(run, sums, losses)
            raise RunTerminated(f"SIGTERM: stopped after step {run.step}, checkpoint {saved}; continue with --resume")
    progress.close()
    if not final:  # resumed at optim.max_iters (``complete``): the final checkpoint is evaluated again
        final = _evaluate(run, None)
        if run.report is not None:
            run.report(final, latest_checkpoint(run.output_dir))
    if accelerator.is_main_process:
        _finish(run)
    return final


class _Sums:
    """Running sums of the logged scalars between two log steps (kept on device: no sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.nonfinite = torch.zeros((), device=device, dtype=torch.long)
        self.counted, self.since = 0, time.perf_counter()

    def reset(self) -> None:
        self.values.clear()
        self.counted, self.since = 0, time.perf_counter()


def _train_step(run: RunState, batches, sums: _Sums) -> tuple[dict[str, Tensor], tuple]:
    """One optimiser step over ``optim.grad_accum`` = k micro-batches; returns the last micro-batch's losses and
    (images, labels, teacher_out).

    Each micro-batch backpropagates its loss / k, so the summed gradients are those of the mean loss over the k
    micro-batches (for per-image terms, the loss of one batch k times larger). DDP all-reduces gradients in the
    backward of the last micro-batch only (``no_sync`` before it); clipping, the optimiser and the scheduler then act
    once, on the accumulated gradients.
    """
    accelerator, o, device = run.accelerator, run.cfg.optim, run.accelerator.device
    needs_teacher = accelerator.unwrap_model(run.model).objective.needs_teacher
    k = o.grad_accum
    for micro in range(k):
        batch = next(batches)
        images, labels = batch["image"].to(device), batch["label"].to(device)
        sync = nullcontext() if micro == k - 1 else accelerator.no_sync(run.model)
        with sync:
            with accelerator.autocast():
                teacher_out = run.teacher(images) if needs_teacher else None
                losses, step_report = run.model(images, labels, teacher_out)
            accelerator.backward(losses["total"] / k)
        sums.nonfinite += (~torch.isfinite(losses["total"].detach())).long()
        for key, value in {**{f"loss/{name}": v for name, v in losses.items()}, **step_report}.items():
            sums.values[key] += value.detach().float()
        sums.counted += 1
    if o.grad_clip > 0:
        accelerator.clip_grad_norm_(run.model.parameters(), o.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return losses, (images, labels, teacher_out)


def _log_train(run: RunState, sums: _Sums, losses: dict[str, Tensor]) -> dict[str, float]:
    _check_finite(sums.nonfinite, run.step, losses, run.output_dir)
    logged = {f"train/{k}": v.item() / sums.counted for k, v in sums.values.items()}
    logged["train/lr"] = run.scheduler.get_last_lr()[0]
    logged["train/sec_per_step"] = (time.perf_counter() - sums.since) / (sums.counted / run.cfg.optim.grad_accum)
    run.tracker.log_metrics(logged, run.step)
    sums.reset()
    return logged


def _checkpoint(run: RunState, sums: _Sums, losses: dict[str, Tensor]) -> Path | None:
    """Write ``checkpoints/step_<step>.pt`` (main process) once the loss is known finite; returns its path."""
    _check_finite(sums.nonfinite, run.step, losses, run.output_dir)
    saved = None
    if run.accelerator.is_main_process:
        saved = save_checkpoint(
            run.output_dir,
            run.step,
            {
                "model": run.accelerator.unwrap_model(run.model).state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "config": to_dict(run.cfg),
            },
        )
    run.accelerator.wait_for_everyone()
    return saved


def _evaluate(run: RunState, batch: tuple | None) -> dict[str, float]:
    """Validate, log the val metrics and (main process) the pictures (pseudo labels of ``batch``, the last training
    batch, if any); returns the flat ``val/...`` metrics."""
    accelerator, cfg, step = run.accelerator, run.cfg, run.step
    unwrapped: TrainModule = accelerator.unwrap_model(run.model)
    metrics, samples = evaluate(
        unwrapped.student,
        run.val_set,
        run.eval_text,
        unwrapped.objective.inference_alpha(),
        cfg.data,
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        reduce=lambda t: accelerator.reduce(t, "sum"),
        progress=cfg.run.progress,
    )
    run.last_eval = metrics
    final = {f"val/{k}": float(v) for k, v in metrics.items() if k in ("pAcc", "mIoU", "mIoU_S", "mIoU_U", "hIoU")}
    run.tracker.log_metrics(eval_metrics(metrics, run.val_set.class_names), step)
    run.tracker.set_tags({"mlflow.note.content": run_description(cfg, metrics, step)})  # the result, first
    final["step"] = step
    plm, val_set = unwrapped.objective.plm, run.val_set
    if accelerator.is_main_process and plm is not None and val_set.split.seen == tuple(run.train_set.class_names):
        diagnostics = plm_diagnostics(
            unwrapped.objective, unwrapped.student, run.teacher, val_set, run.eval_text, accelerator.device
        )
        run.tracker.log_metrics({f"val/{k}": v for k, v in diagnostics.items()}, step)
    if accelerator.is_main_process and cfg.tracking.log_images:
        images_dir, class_names = run.output_dir / "images", run.val_set.class_names
        for i, (image, target, pred) in enumerate(samples):
            panel = prediction_panel(image, target, pred, class_names, run.val_set.unseen_ids)
            _save_picture(panel, images_dir / f"val_{i}_step{step}.png", run.tracker, f"val/prediction_{i}", step)
        if unwrapped.objective.plm is not None and batch is not None:
            images, labels, teacher_out = batch
            for i in range(min(2, len(images))):
                image, label = images[i].float().cpu().numpy(), labels[i].cpu().numpy()
                panel = plm_panel(image, label, teacher_out.dense[i], cfg.plm.kmeans, run.train_set.class_names)
                path = images_dir / f"pseudo_{i}_step{step}.png"
                _save_picture(panel, path, run.tracker, f"train/pseudo_labels_{i}", step)
    return final


def _stop_requested(run: RunState) -> bool:
    """SIGTERM seen by any process (all processes must stop at the same step to write one checkpoint)."""
    flag = run.stop.requested
    if run.accelerator.num_processes == 1:
        return flag
    total = run.accelerator.reduce(torch.tensor(int(flag), device=run.accelerator.device), "sum")
    return int(total.item()) > 0


def _finish(run: RunState) -> None:
    """Export model.pt (the logged student, with its val metrics; registered with ``tracking.register_as``), the
    confusion picture and the results table; end the MLflow run as FINISHED."""
    unwrapped: TrainModule = run.accelerator.unwrap_model(run.model)
    output_dir, tracker, val_set = run.output_dir, run.tracker, run.val_set
    bundle = export_model(
        output_dir / MODEL_FILE,
        unwrapped.student.state_dict(),
        to_dict(run.cfg),
        {"alpha": unwrapped.objective.inference_alpha(), "embed_dim": run.teacher.embed_dim},
    )
    tracker.log_artifact(bundle)
    tracker.log_student(bundle)
    headline = {f"val/{m}": float(run.last_eval[m]) for m in ("mIoU", *HEADLINE)}
    tracker.log_model_metrics(headline, run.step)
    if run.cfg.tracking.register_as:
        _register(run, headline["val/hIoU"])
    tracker.log_artifact(output_dir / "config.yaml")
    confusion = confusion_picture(run.last_eval["matrix"].numpy(), val_set.class_names, val_set.unseen_ids)
    path = output_dir / "images" / f"confusion_step{run.step}.png"
    _save_picture(confusion, path, tracker, "val/confusion", run.step)
    table = format_table(run.last_eval, val_set.class_names, val_set.unseen_ids)
    (output_dir / "results.txt").write_text(table + "\n")
    tracker.log_artifact(output_dir / "results.txt")
    tracker.finish()
    print(table)
    if run.cfg.tracking.enabled:
        experiment = getattr(tracker, "sink", tracker).experiment_id  # the Tracker behind the spool
        print(f"\nBrowse this run:\n{browse_hint(tracker.uri, tracker.run_id, experiment)}")


def _register(run: RunState, hiou: float) -> None:
    """Register the run's student as ``tracking.register_as`` (``NAME`` or ``NAME@ALIAS``; the alias defaults to the
    run folder's name)."""
    model, _, alias = run.cfg.tracking.register_as.partition("@")
    name = run_name(run.cfg)
    tags = {"clipzss.run": name, "clipzss.output_dir": str(run.output_dir), "val/hIoU": f"{hiou:.2f}"}
    description = f"{name}: val/hIoU {hiou:.2f} at step {run.step}"
    run.tracker.register_student(model, alias or run.output_dir.name, tags, description)


def deliver_spooled(run_dir: str | Path, wait: float) -> int:
    """Deliver the MLflow records a run left in its spool (``clipzss sync``); returns how many still wait."""
    run_dir = Path(run_dir)
    waiting = pending_records(run_dir)
    if waiting == 0:
        print(f"{run_dir}: nothing waits for delivery")
        return 0
    cfg = load_config(run_dir / "config.yaml")
    with run_dir_lock(run_dir):
        left = Spool(Tracker(cfg.tracking, run_dir, mark_running=False), run_dir, quiet_http=quick_http).close(wait)
    print(f"{run_dir}: delivered {waiting - left} of {waiting} spooled tracking record(s)")
    return left


def browse_hint(uri: str, run_id: str, experiment_id: str) -> str:
    """How to open the run in the MLflow UI, in its model-training view (MLflow 3 opens experiments in its GenAI
    view otherwise): over a local store, ``mlflow ui`` with the store's artifact folder and one worker (the default
    four take ~2 GB), then the runs table (its shared view shows the headline metrics) and the run."""
    mode = "workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        base, command = uri.rstrip("/"), ""
    else:
        database = Path(uri.removeprefix("sqlite:///"))
        base = "http://127.0.0.1:5000"
        command = (
            f"  mlflow ui --backend-store-uri {uri} --default-artifact-root {database.parent / 'mlruns'} "
            "--workers 1 --port 5000\n"
        )
    experiment = f"{base}/#/experiments/{experiment_id}"
    return (
        f"{command}  runs:     {experiment}/runs?viewStateShareKey={VIEW_KEY}&{mode}\n"
        f"  this run: {experiment}/runs/{run_id}?{mode}"
    )


def _progress(cfg: Config, start: int, main: bool):
    from tqdm import tqdm

    return tqdm(
        total=cfg.optim.max_iters,
        initial=start,
        desc="train",
        disable=not (main and cfg.run.progress),
        dynamic_ncols=True,
    )


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(
        prog="clipzss/train.py",
        description="Train a CLIP-ZSS student. With no CONFIG, runs the offline synthetic benchmark preset.",
    )
    parser.add_argument(
        "items", nargs="*", help="an optional CONFIG.yaml or preset name, then section.key=value overrides"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.output_dir")
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)  # read by run_reporting_errors
    parser.add_argument(
        "--register-as",
        metavar="NAME[@ALIAS]",
        help="register the trained student in MLflow's model registry (tracking.register_as)",
    )
    args = parser.parse_args(argv)
    config = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if args.register_as:
        overrides.append(f"tracking.register_as={args.register_as}")
    if len(config) > 1:
        parser.error(f"at most one CONFIG may be given, got {config}")
    return load_config(config[0] if config else "synthetic", overrides), args.resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    try:
        train(cfg, resume=resume)
    except RunTerminated as e:
        print(e, file=sys.stderr)
        return RunTerminated.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): MLflow says KILLED; --resume continues from the last checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, sys.argv[1:]))
