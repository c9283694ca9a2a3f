"""Generalised zero-shot segmentation metrics from one confusion matrix: pAcc, mIoU, mIoU(S), mIoU(U), hIoU.

All numbers are percentages. A class absent from both the ground truth and the predictions has no IoU (nan) and is
left out of every mean. hIoU = 2·S·U / (S + U), 0 when S + U = 0, and nan when the split has no unseen class (or
no unseen class occurs): a harmonic mean of one number is not reported as if it were one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates an N x N pixel confusion matrix (rows = ground truth, cols = prediction) as a plain LongTensor,
    so a distributed caller can sum it across processes.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch; pixels whose target is ``ignore_index`` are skipped.

        Args:
            pred: LongTensor [...] predicted ids in [0, N).
            target: LongTensor of pred's shape, ids in [0, N) or ignore_index.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        target = target.to(pred.device)
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long()
        n = self.num_classes
        if ((t < 0) | (t >= n) | (p < 0) | (p >= n)).any():
            raise ValueError(f"pred/target ids must be in [0, {n}) (target may also be {self.ignore_index})")
        counts = torch.bincount(t * n + p, minlength=n * n).view(n, n)  # [N*N] -> [N (gt), N (pred)]
        self.matrix += counts.to(self.matrix.device)


def zero_shot_metrics(matrix: Tensor | np.ndarray, unseen_ids: Sequence[int]) -> dict[str, float | list]:
    """pAcc, mIoU, mIoU_S, mIoU_U, hIoU (percent) and ``iou`` (per-class list, percent, nan for absent classes).

    Args:
        matrix: [N, N] confusion counts, rows = ground truth, cols = prediction.
        unseen_ids: ids of the unseen classes; every other id is seen.
    """
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    m = m.astype(np.float64)
    tp = np.diag(m)
    union = m.sum(1) + m.sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100
    unseen = np.zeros(len(iou), dtype=bool)
    unseen[list(unseen_ids)] = True

    def mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    total = m.sum()
    seen_miou, unseen_miou = mean(iou[~unseen]), mean(iou[unseen])
    if np.isnan(seen_miou) or np.isnan(unseen_miou):
        hiou = float("nan")
    elif seen_miou + unseen_miou == 0:
        hiou = 0.0
    else:
        hiou = 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
    return {
        "pAcc": float(tp.sum() / total * 100) if total > 0 else float("nan"),
        "mIoU": mean(iou),
        "mIoU_S": seen_miou,
        "mIoU_U": unseen_miou,
        "hIoU": hiou,
        "iou": [float(v) for v in iou],
    }


def format_table(metrics: dict, class_names: Sequence[str], unseen_ids: Sequence[int]) -> str:
    """A summary row (pAcc, mIoU, mIoU(S), mIoU(U), hIoU) and a per-class IoU table marking seen/unseen classes."""
    keys = [("pAcc", "pAcc"), ("mIoU", "mIoU"), ("mIoU_S", "mIoU(S)"), ("mIoU_U", "mIoU(U)"), ("hIoU", "hIoU")]
    header = " | ".join(f"{label:>8}" for _, label in keys)
    summary = " | ".join(f"{metrics[k]:8.2f}" for k, _ in keys)
    width = max([len("class"), *(len(c) for c in class_names)])
    unseen = set(unseen_ids)
    rows = [f"{'class':<{width}} | split |      IoU", f"{'-' * width}-+-------+---------"]
    for i, (name, value) in enumerate(zip(class_names, metrics["iou"], strict=True)):
        rows.append(f"{name:<{width}} | {'U' if i in unseen else 'S':>5} | {value:8.2f}")
    return "\n".join([header, summary, "", *rows])
