"""The CLIP-ZSS trainer.

    accelerate launch clipzss/train.py [CONFIG.yaml | PRESET] [section.key=value ...] [--resume]

With no CONFIG the offline ``synthetic`` preset runs. :func:`train` is the importable entry point that this CLI,
the tests and the Ray Tune trainable in ``sweeps/`` all call.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from clipzss.config import Config, flatten, load_config, save_config, to_dict
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
from clipzss.engine.tracking import NullTracker, Tracker, eval_metrics, log_datasets, run_description, run_name
from clipzss.engine.visualize import confusion_picture, plm_panel, prediction_panel
from clipzss.method.objective import CLIPZSSObjective
from clipzss.metrics import format_table
from clipzss.models.students import build_student
from clipzss.models.teacher import CLIPTeacher
from clipzss.paths import resolve_path

Report = Callable[[dict[str, float], Path | None], None]


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


def _save_picture(picture: np.ndarray, path: Path, tracker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    tracker.log_artifact(path, "images")


def train(cfg: Config, report: Report | None = None, resume: bool = False) -> dict[str, float]:
    """Train a CLIP-ZSS student as configured; returns the final ``val/...`` metrics.

    Args:
        cfg: the resolved configuration.
        report: called after every evaluation with the flat metrics and the checkpoint just written (Ray Tune).
        resume: continue from the latest checkpoint in ``cfg.run.output_dir`` (exactly: same data, same RNG).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        cpu=cfg.run.device == "cpu",
    )
    device, main = accelerator.device, accelerator.is_main_process
    output_dir = Path(resolve_path(cfg.run.output_dir))
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None and not resume:  # never overwrite a run: start beside it
        taken, output_dir = output_dir, _fresh_sibling(output_dir)
        cfg = copy.deepcopy(cfg)
        cfg.run.output_dir = str(output_dir)
        checkpoint = None
        accelerator.print(
            f"{taken} already holds a run (pass --resume to continue it); this one writes to {output_dir}"
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
    objective = CLIPZSSObjective(cfg, seen_text)
    model = TrainModule(student, objective).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_with_warmup(cfg))

    start = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start}")
    # The scheduler is stepped by hand once per optimiser step (a prepared one steps once per process).
    model, optimizer = accelerator.prepare(model, optimizer)

    tracker = NullTracker()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        if cfg.tracking.enabled:
            tags = {"clipzss.dataset": cfg.data.dataset}
            if cfg.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
            tracker = Tracker(cfg.tracking, output_dir, run_name(cfg), tags, run_description(cfg))
            tracker.log_params(flatten(cfg))
            log_datasets(tracker, cfg, train_set, val_set)
            tracker.log_dict(to_dict(cfg), "config.yaml")

    try:
        final = _loop(cfg, accelerator, teacher, model, optimizer, scheduler, train_set, val_set, eval_text, tracker,
                      output_dir, start, report)  # fmt: skip
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _loop(cfg, accelerator, teacher, model, optimizer, scheduler, train_set, val_set, eval_text, tracker, output_dir,
          start, report) -> dict[str, float]:  # fmt: skip
    """The training loop proper, from optimiser step ``start`` to ``optim.max_iters``; returns the last val metrics."""
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    unwrapped: TrainModule = accelerator.unwrap_model(model)
    o = cfg.optim
    batches = training_batches(
        train_set, cfg.data.batch_size, cfg.run.seed, cfg.data.num_workers, rank, world, start * o.grad_accum
    )
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    nonfinite = torch.zeros((), device=device, dtype=torch.long)
    counted, last_log, final = 0, time.perf_counter(), {}
    needs_teacher = unwrapped.objective.needs_teacher
    progress = _progress(cfg, start, main)
    model.train()
    step = start
    while step < o.max_iters:
        for _ in range(o.grad_accum):
            batch = next(batches)
            images, labels = batch["image"].to(device), batch["label"].to(device)
            with accelerator.accumulate(model), accelerator.autocast():
                teacher_out = teacher(images) if needs_teacher else None
                losses, step_report = model(images, labels, teacher_out)
                accelerator.backward(losses["total"])
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            nonfinite += (~torch.isfinite(losses["total"].detach())).long()
            for key, value in {**{f"loss/{k}": v for k, v in losses.items()}, **step_report}.items():
                sums[key] += value.detach().float()
            counted += 1
        scheduler.step()
        step += 1
        progress.update(1)

        if step % cfg.run.log_interval == 0 or step == o.max_iters:
            _check_finite(nonfinite, step, losses, output_dir)
            logged = {f"train/{k}": v.item() / counted for k, v in sums.items()}
            logged["train/lr"] = scheduler.get_last_lr()[0]
            logged["train/sec_per_step"] = (time.perf_counter() - last_log) / (counted / o.grad_accum)
            tracker.log_metrics(logged, step)
            progress.set_postfix(loss=f"{logged['train/loss/total']:.3f}")
            sums.clear()
            counted, last_log = 0, time.perf_counter()

        saved = None
        if (cfg.run.checkpoint_interval and step % cfg.run.checkpoint_interval == 0) or step == o.max_iters:
            _check_finite(nonfinite, step, losses, output_dir)
            if main:
                saved = save_checkpoint(
                    output_dir,
                    step,
                    {
                        "model": unwrapped.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "config": to_dict(cfg),
                    },
                )
            accelerator.wait_for_everyone()

        if (cfg.run.eval_interval and step % cfg.run.eval_interval == 0) or step == o.max_iters:
            metrics, samples = evaluate(
                unwrapped.student,
                val_set,
                eval_text,
                float(unwrapped.objective.scales()[0]),
                cfg.data,
                device,
                rank,
                world,
                reduce=lambda t: accelerator.reduce(t, "sum"),
                progress=cfg.run.progress,
            )
            final = {
                f"val/{k}": float(v) for k, v in metrics.items() if k in ("pAcc", "mIoU", "mIoU_S", "mIoU_U", "hIoU")
            }
            tracker.log_metrics(eval_metrics(metrics, val_set.class_names), step)
            final["step"] = step
            if main and cfg.tracking.log_images:
                for i, (image, target, pred) in enumerate(samples):
                    panel = prediction_panel(image, target, pred, val_set.class_names, val_set.unseen_ids)
                    _save_picture(panel, output_dir / "images" / f"val_{i}_step{step}.png", tracker)
                if unwrapped.objective.plm is not None:
                    for i in range(min(2, len(images))):
                        image, label = images[i].float().cpu().numpy(), labels[i].cpu().numpy()
                        panel = plm_panel(image, label, teacher_out.dense[i], cfg.plm.kmeans, train_set.class_names)
                        _save_picture(panel, output_dir / "images" / f"pseudo_{i}_step{step}.png", tracker)
            if report is not None:
                report(final, saved)
    progress.close()

    if main:
        extra = {"alpha": float(unwrapped.objective.scales()[0]), "embed_dim": teacher.embed_dim}
        bundle = export_model(output_dir / MODEL_FILE, unwrapped.student.state_dict(), to_dict(cfg), extra)
        tracker.log_artifact(bundle)
        tracker.log_student(unwrapped.student.state_dict(), to_dict(cfg), extra)
        tracker.log_artifact(output_dir / "config.yaml")
        confusion = confusion_picture(metrics["matrix"].numpy(), val_set.class_names, val_set.unseen_ids)
        _save_picture(confusion, output_dir / "images" / f"confusion_step{step}.png", tracker)
        table = format_table(metrics, val_set.class_names, val_set.unseen_ids)
        (output_dir / "results.txt").write_text(table + "\n")
        tracker.log_artifact(output_dir / "results.txt")
        tracker.finish()
        print(table)
        if cfg.tracking.enabled:
            print(f"\nBrowse this run: mlflow ui --backend-store-uri {tracker.uri}   (then open http://127.0.0.1:5000)")
    return final


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
    args = parser.parse_args(argv)
    config = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(config) > 1:
        parser.error(f"at most one CONFIG may be given, got {config}")
    return load_config(config[0] if config else "synthetic", overrides), args.resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    train(cfg, resume=resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
