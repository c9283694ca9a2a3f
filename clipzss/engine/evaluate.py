"""Zero-shot evaluation of a student over a dataset's full vocabulary (seen + unseen classes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from clipzss.config import DataConfig
from clipzss.engine.inference import predict
from clipzss.metrics import ConfusionMatrix, zero_shot_metrics


@torch.no_grad()
def evaluate(
    student: nn.Module,
    dataset,
    text: Tensor,
    alpha: float,
    cfg: DataConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
    progress: bool = True,
    keep: int = 4,
) -> tuple[dict, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Confusion matrix over ``dataset.class_names`` (sharded by rank, summed with ``reduce``) and its metrics.

    Args:
        text: T [N, C] for the dataset's classes, in label-id order.
        keep: how many (image, target, prediction) triples of rank 0 to return for pictures.

    Returns:
        (metrics from :func:`clipzss.metrics.zero_shot_metrics` plus the raw matrix, kept samples)
    """
    was_training = student.training
    student.eval()
    confusion = ConfusionMatrix(len(dataset.class_names), device=device)
    total = len(dataset) if cfg.max_eval_images <= 0 else min(cfg.max_eval_images, len(dataset))
    indices = range(rank, total, world)
    samples = []
    for i in tqdm(indices, desc="eval", disable=not progress or rank != 0, leave=False):
        item = dataset[i]
        image, target = item["image"].to(device), item["label"].to(device)
        pred = predict(student, image, text, alpha, cfg.test_window, cfg.test_stride, tuple(target.shape))
        confusion.update(pred, target)
        if len(samples) < keep and rank == 0:
            samples.append((item["image"].numpy(), item["label"].numpy(), pred.cpu().numpy()))
    student.train(was_training)
    matrix = reduce(confusion.matrix)
    metrics = zero_shot_metrics(matrix.cpu(), dataset.unseen_ids)
    metrics["matrix"] = matrix.cpu()
    return metrics, samples
