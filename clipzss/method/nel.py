"""ZegCLIP's non-mutually-exclusive loss (NEL): per-class sigmoid focal loss plus dice loss.

Zhou et al., "ZegCLIP: Towards Adapting CLIP for Zero-shot Semantic Segmentation", CVPR 2023
(github.com/ZiqinZhou66/ZegCLIP, ``models/losses/atm_loss.py``: ``SegLossPlus`` with mask_weight 100, dice_weight 1,
and the Mask2Former ``sigmoid_focal_loss`` / ``dice_loss`` it calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


class NonMutuallyExclusiveLoss(nn.Module):
    """Sigmoid focal + dice loss over the classes present in each image, each class a binary mask.

    As in ZegCLIP, only the (image, class) pairs whose class occurs in the target are supervised, every channel as
    an independent binary mask, and both terms are summed over those pairs and divided by their number. Unlike
    ZegCLIP, ``ignore_index`` pixels are left out of both terms (ZegCLIP counts them as negatives of every class);
    here they are the unseen or unclustered pixels, which must not be pushed away from any class.

    Args:
        focal_weight: weight of the focal term (100).
        dice_weight: weight of the dice term (1).
        alpha: focal alpha (0.25).
        gamma: focal gamma (2).
        ignore_index: label of pixels without supervision (255).
    """

    def __init__(
        self,
        focal_weight: float = 100.0,
        dice_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.alpha, self.gamma, self.ignore_index = alpha, gamma, ignore_index

    def forward(self, logits: Tensor, target: Tensor, channel_valid: Tensor | None = None) -> Tensor:
        """Loss of per-pixel class logits against a label map.

        Args:
            logits: [B, N, H, W] per-class logits (at the target's resolution).
            target: [B, H, W] long, class id in 0..N-1 or ignore_index.
            channel_valid: [B, N] bool, False on padded channels (never supervised); None = all valid.

        Returns:
            Scalar: focal_weight * focal + dice_weight * dice, each summed over the present (image, class) pairs and
            divided by their number (0, still attached to the graph, when no class is present).
        """
        B, N = logits.shape[:2]
        ids = target.flatten(1).clamp(max=N)  # ignore (and any id >= N) -> bin N
        ids = ids + (N + 1) * torch.arange(B, device=target.device)[:, None]
        present = torch.bincount(ids.flatten(), minlength=B * (N + 1)).view(B, N + 1)[:, :N] > 0  # [B, N]
        if channel_valid is not None:
            present &= channel_valid
        image, cls = present.nonzero(as_tuple=True)  # P present (image, class) pairs
        if image.numel() == 0:
            return logits.sum() * 0
        x = logits[image, cls].flatten(1).float()  # [P, H*W]
        labels = target[image].flatten(1)  # [P, H*W]
        t = (labels == cls[:, None]).float()
        valid = (labels != self.ignore_index).float()
        return (self.focal_weight * self._focal(x, t, valid) + self.dice_weight * self._dice(x, t, valid)) / len(image)

    def _focal(self, x: Tensor, t: Tensor, valid: Tensor) -> Tensor:
        """Sum over pairs of the mean focal loss over valid pixels."""
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = self.alpha * t + (1 - self.alpha) * (1 - t)
        loss = alpha_t * ce * (1 - p_t) ** self.gamma
        return ((loss * valid).sum(1) / valid.sum(1).clamp_min(1)).sum()

    def _dice(self, x: Tensor, t: Tensor, valid: Tensor) -> Tensor:
        """Sum over pairs of 1 - (2|p t| + 1) / (|p| + |t| + 1) over valid pixels."""
        p = x.sigmoid() * valid
        return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum()
