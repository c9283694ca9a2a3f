"""Pixel Learning Module (METHOD.md, PLM): pseudo labels F, region centroids, prototypes and their logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipzss.config import PLMConfig
from clipzss.method.kmeans import multiscale_kmeans
from clipzss.method.pseudo_labels import IGNORE_INDEX, fuse_clusters, fused_labels
from clipzss.method.synthesizer import Synthesizer

if TYPE_CHECKING:
    from clipzss.models.teacher import TeacherOutput


@dataclass
class PLMOutput:
    """What the PLM adds to the training logits.

    Attributes:
        labels: [B, H, W] F: seen ids 0..Ns-1, potential ids Ns..Ns+Kp-1, or 255.
        potential_logits: [B, Kp, h, w] beta * cos(R, P_pseudo), Kp = the most potential classes of an image.
        potential_valid: [B, Kp] bool, False on channels padding an image with fewer potential classes.
        bce: scalar L_bce of the seen prototypes, or None without the synthesizer.
        report: detached scalars for logging.
    """

    labels: Tensor
    potential_logits: Tensor
    potential_valid: Tensor
    bce: Tensor | None
    report: dict[str, Tensor]


def region_centroids(R: Tensor, labels: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
    """Normalised mean of R inside each region of a label map, computed at R's resolution.

    F is resampled to R's grid by area: each cell of R weighs a region by how many of the region's label pixels
    fall in that cell (cell of pixel (y, x) = (floor(y h / H), floor(x w / W))). This equals averaging the
    nearest-upsampled R over the region's pixels, without materialising R at the label size.

    Args:
        R: [B, C, h, w] student features.
        labels: [B, H, W] long region id in 0..num_regions-1, or any id outside that range (ignored, e.g. 255).
        num_regions: N, regions per image.

    Returns:
        (centroids [B, N, C] L2-normalised, zero for absent regions; present [B, N] bool).
    """
    B, C, h, w = R.shape
    H, W = labels.shape[-2:]
    rows = torch.arange(H, device=R.device) * h // H
    cols = torch.arange(W, device=R.device) * w // W
    cell = (rows[:, None] * w + cols[None, :]).flatten()  # [H*W] index into L = h*w
    region = labels.flatten(1)  # [B, H*W]
    inside = (region >= 0) & (region < num_regions)
    image = torch.arange(B, device=R.device)[:, None]
    index = ((image * num_regions + region.clamp(0, num_regions - 1)) * (h * w) + cell)[inside]
    weights = torch.bincount(index, minlength=B * num_regions * h * w).view(B, num_regions, h * w).to(R.dtype)
    sums = torch.bmm(weights, R.flatten(2).transpose(1, 2))  # [B, N, C]
    return F.normalize(sums, dim=-1), weights.sum(-1) > 0


class PixelLearning(nn.Module):
    """Pseudo labels from the teacher's dense tokens, and the pixel logits of the potential classes.

    Args:
        cfg: the ``plm`` config section (kmeans and synthesizer settings are read here).
        embed_dim: C.
    """

    def __init__(self, cfg: PLMConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        syn = cfg.synthesizer
        self.synthesizer = Synthesizer(embed_dim, syn.layers, syn.heads, syn.dense_memory) if syn.enabled else None

    @torch.no_grad()
    def pseudo_labels(self, dense: Tensor, labels: Tensor, num_seen: int) -> tuple[Tensor, dict[str, Tensor]]:
        """F from multi-scale K-Means on the teacher's dense tokens, fused and merged with the seen labels.

        Runs in float32 with autocast off: cluster assignments are argmaxes of near-equal cosines.

        Args:
            dense: [B, C, h', w'] teacher dense tokens (normalised).
            labels: [B, H, W] seen ids in 0..Ns-1 or 255.
            num_seen: Ns.

        Returns:
            (F [B, H, W], report of detached scalars).
        """
        km = self.cfg.kmeans
        with torch.autocast(device_type=dense.device.type, enabled=False):
            result = multiscale_kmeans(dense.float(), km.scales, km.iters)
            assign, num_clusters, _ = fuse_clusters(result, km.fuse_threshold)
        clusters = assign.view(-1, *result.grid)  # [B, h', w']
        fused = fused_labels(labels, clusters, num_seen, km.drop_seen_ratio)
        unlabelled = labels == IGNORE_INDEX
        potential = (fused >= num_seen) & (fused != IGNORE_INDEX)
        report = {
            "plm/kmeans_inertia": result.inertia.mean() / result.tokens.shape[1],  # mean 1 - cos per token
            "plm/fused_clusters": num_clusters.float().mean(),
            "plm/potential_classes": (fused.flatten(1).masked_fill(~potential.flatten(1), -1).amax(1) - num_seen + 1)
            .clamp_min(0)
            .float()
            .mean(),
            "plm/pseudo_coverage": potential.sum() / unlabelled.sum().clamp_min(1),  # of the 255 pixels
        }
        return fused, report

    def forward(
        self, R: Tensor, teacher: TeacherOutput, labels: Tensor, seen_text: Tensor, alpha: Tensor, beta: Tensor
    ) -> PLMOutput:
        """Pseudo labels, prototypes of every region, L_bce and the potential-class logits.

        Args:
            R: [B, C, h, w] student features (normalised).
            teacher: .cls [B, C] and .dense [B, C, h', w'] (normalised).
            labels: [B, H, W] seen ids in 0..Ns-1 or 255.
            seen_text: [Ns, C] normalised seen-class text embeddings.
            alpha: scale of the seen prototype-text logits in L_bce.
            beta: scale of cos(R, P_pseudo).

        Returns:
            See :class:`PLMOutput`.
        """
        num_seen = seen_text.shape[0]
        fused, report = self.pseudo_labels(teacher.dense, labels, num_seen)
        num_potential = int(fused.masked_fill(fused == IGNORE_INDEX, -1).max()) + 1 - num_seen  # host sync
        num_potential = max(num_potential, 0)
        centroids, present = region_centroids(R, fused, num_seen + num_potential)  # [B, Ns+Kp, C], [B, Ns+Kp]
        bce = None
        if self.synthesizer is not None:
            prototypes = self.synthesizer(centroids, present, teacher.cls, teacher.dense)
            bce = self._bce(prototypes[:, :num_seen], present[:, :num_seen], seen_text, alpha)
            pseudo = prototypes[:, num_seen:]  # [B, Kp, C]
        else:
            pseudo = centroids[:, num_seen:]
        logits = beta * torch.einsum("bchw,bkc->bkhw", F.normalize(R, dim=1), pseudo)  # [B, Kp, h, w]
        return PLMOutput(fused, logits, present[:, num_seen:], bce, report)

    @staticmethod
    def _bce(prototypes: Tensor, present: Tensor, seen_text: Tensor, scale: Tensor) -> Tensor:
        """L_bce: sigmoid(scale P_seen T_seen^T) against one-hot (each seen prototype matches its own class text).

        Args:
            prototypes: [B, Ns, C] seen prototypes; present: [B, Ns] bool (absent classes have no prototype);
            seen_text: [Ns, C]; scale: logit scale.

        Returns:
            Scalar, mean over present prototypes and the Ns text classes (0, attached, if none is present).
        """
        logits = scale * prototypes @ seen_text.t()  # [B, Ns, Ns]
        target = torch.eye(seen_text.shape[0], device=logits.device, dtype=logits.dtype).expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)  # [B, Ns]
        return (loss * present).sum() / present.sum().clamp_min(1)
