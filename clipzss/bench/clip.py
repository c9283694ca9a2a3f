"""The CLIP ViT-B/16 the benchmark times: the real architecture with random weights (speed does not depend on them)."""

from __future__ import annotations

import logging

import torch


def random_vit_b16(device: torch.device):
    """A frozen ``CLIPTeacher`` around a random-init open_clip ViT-B/16, on ``device``.

    open_clip logs "No pretrained weights loaded ... initialized randomly" at WARNING; random init is the intent
    here, so that one construction runs with the root logger at ERROR (restored afterwards).
    """
    from clipzss.config import TeacherConfig
    from clipzss.models.teacher import CLIPTeacher

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return CLIPTeacher(TeacherConfig(model="ViT-B-16", pretrained="")).to(device)
    finally:
        root.setLevel(level)
