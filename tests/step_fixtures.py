"""One optimiser step of the real trainer (``clipzss.train._train_step``) on fixed batches, for equivalence tests.

The run is the tiny set-up of ``tiny_run`` with two changes that make a step's gradients comparable across batch
splits: the student is in eval mode (its BatchNorm uses running statistics and dropout is off, so a sample's
features do not depend on the other samples of its batch; every student in ``clipzss.models.students`` has
BatchNorm somewhere), and the optimiser is plain SGD at lr 1 (no momentum, no decay), so a parameter's change in one
step is minus its (clipped) gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tiny_run import tiny_overrides
from torch import Tensor

from clipzss.config import Config, load_config
from clipzss.data.datasets import build_dataset
from clipzss.engine.tracking import NullTracker
from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.students import build_student
from clipzss.models.teacher import CLIPTeacher
from clipzss.train import RunState, TrainModule, _Sums, _train_step, poly_with_warmup

# The per-image objective: NEL + CE on fully labelled images (the same number of labelled pixels in each, so a
# pixel mean over a batch is the mean of its images' means). The GLM's in-batch negatives and the PLM's means over
# potential pixels are per micro-batch by design: they are added where a test needs them.
PER_IMAGE = {"glm.weight": 0, "plm.enabled": "false", "plm.nel_weight": 1.0, "optim.warmup_iters": 0}


def step_config(assets: dict, out: Path, **overrides) -> Config:
    return load_config(None, tiny_overrides(assets, out, **{"tracking.enabled": "false", **PER_IMAGE, **overrides}))


def fixed_batch(cfg: Config, n: int, num_classes: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """n random crops [n, 3, S, S] with every pixel labelled by a random seen class id [n, S, S]."""
    generator = torch.Generator().manual_seed(seed)
    size = cfg.data.crop_size
    images = torch.rand(n, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (n, size, size), generator=generator)
    return images, labels


def micro_batches(images: Tensor, labels: Tensor, size: int) -> Iterator[dict[str, Tensor]]:
    return iter({"image": x, "label": y} for x, y in zip(images.split(size), labels.split(size), strict=True))


def build_run(cfg: Config, accelerator) -> RunState:
    """A prepared RunState (same initial weights on every process: seeded), ready for ``_train_step``."""
    train_set = build_dataset(cfg.data, "train")
    teacher = CLIPTeacher(cfg.teacher)
    seen_text = teacher.encode_text(train_set.class_names)
    torch.manual_seed(0)
    model = TrainModule(build_student(cfg.student, teacher.embed_dim), CLIPZSSObjective(cfg, seen_text))
    model.student.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_with_warmup(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    return RunState(cfg, accelerator, teacher, model, optimizer, scheduler, train_set, None, None, NullTracker(),
                    Path(cfg.run.output_dir), None, None)  # fmt: skip


def parameters(run: RunState) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in run.accelerator.unwrap_model(run.model).named_parameters()}


def one_step(run: RunState, batches: Iterator[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Run ``_train_step``; returns minus each parameter's change (the applied gradient at lr 1) and the mean
    logged value of each loss term over the micro-batches."""
    before = parameters(run)
    sums = _Sums(run.accelerator.device)
    _train_step(run, batches, sums)
    after = parameters(run)
    means = {k: float(v) / sums.counted for k, v in sums.values.items() if k.startswith("loss/")}
    return {k: before[k] - after[k] for k in before}, means
