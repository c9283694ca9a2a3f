"""Test-time segmentation with the student alone: text embeddings of any vocabulary, sliding-window logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipzss.method.objective import seen_logits


@torch.no_grad()
def slide_logits(student: nn.Module, image: Tensor, text: Tensor, alpha: float, window: int, stride: int) -> Tensor:
    """mmseg-style sliding-window inference.

    Args:
        student: maps [1, 3, h, w] to normalised dense features R [1, C, h/s, w/s].
        image: [1, 3, H, W], normalised as the student expects.
        text: T [N, C] normalised text embeddings of the vocabulary.
        alpha: logit scale.
        window, stride: window size and stride in pixels; an image smaller than the window is one window.

    Returns:
        logits [1, N, H, W], averaged over overlapping windows.
    """
    _, _, height, width = image.shape
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    logits = image.new_zeros((1, text.shape[0], height, width))
    counts = image.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, max(height - window, 0)), min(c * stride, max(width - window, 0))
            y2, x2 = min(y1 + window, height), min(x1 + window, width)
            crop = image[:, :, y1:y2, x1:x2]
            crop_logits = seen_logits(student(crop), text, alpha)  # [1, N, h, w]
            logits[:, :, y1:y2, x1:x2] += F.interpolate(
                crop_logits, (y2 - y1, x2 - x1), mode="bilinear", align_corners=False
            )
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


@torch.no_grad()
def predict(
    student: nn.Module, image: Tensor, text: Tensor, alpha: float, window: int, stride: int, size: tuple[int, int]
) -> Tensor:
    """Class ids [H_out, W_out] for one image [3, H, W]; logits are resized to ``size`` (the label's) first."""
    logits = slide_logits(student, image[None], text, alpha, window, stride)
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
    return logits[0].argmax(0)
