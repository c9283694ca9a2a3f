"""Pixel Learning Module (docs/pages/method.md, PLM): pseudo labels F, region centroids, prototypes and their logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipzss.config import PLMConfig
from clipzss.method.kmeans import multiscale_kmeans, total_clusters
from clipzss.method.prototype_loss import PrototypeTextLoss
from clipzss.method.pseudo_labels import IGNORE_INDEX, fuse_clusters, fused_labels
from clipzss.method.synthesizer import Synthesizer

if TYPE_CHECKING:
    from clipzss.models.teacher import TeacherOutput


@dataclass
class PLMOutput:
    """What the PLM adds to the training logits.

    Attributes:
        labels: [B, H, W] F: seen ids 0..Ns-1, potential ids Ns..Ns+Kp-1, or 255.
        potential_logits: [B, Kp, h, w] beta * cos(R, P_pseudo), Kp = K of the K-Means (a bound from the shapes).
        potential_valid: [B, Kp] bool, False on the channels of potential ids an image does not use.
        pseudo: [B, Kp, C] P_pseudo, the potential classes' weights (normalised).
        text_loss: scalar loss of the seen prototypes against their texts, or None without the synthesizer.
        report: detached scalars for logging.
    """

    labels: Tensor
    potential_logits: Tensor
    potential_valid: Tensor
    pseudo: Tensor
    text_loss: Tensor | None
    report: dict[str, Tensor]


def region_weights(labels: Tensor, num_regions: int, h: int, w: int) -> Tensor:
    """How many label pixels of each region fall in each cell of an h x w grid.

    Cell of pixel (y, x) = (floor(y h / H), floor(x w / W)): averaging grid features with these weights equals
    averaging the nearest-upsampled features over the region's pixels, without materialising them at label size.

    Args:
        labels: [B, H, W] long region id in 0..num_regions-1, or any id outside that range (ignored, e.g. 255).
        num_regions: N, regions per image.
        h, w: the grid.

    Returns:
        [B, N, h*w] float pixel counts.
    """
    B = labels.shape[0]
    H, W = labels.shape[-2:]
    rows = torch.arange(H, device=labels.device) * h // H
    cols = torch.arange(W, device=labels.device) * w // W
    cell = (rows[:, None] * w + cols[None, :]).flatten()  # [H*W] index into L = h*w
    region = labels.flatten(1)  # [B, H*W]
    inside = (region >= 0) & (region < num_regions)
    image = torch.arange(B, device=labels.device)[:, None]
    index = ((image * num_regions + region.clamp(0, num_regions - 1)) * (h * w) + cell).flatten()
    # outside pixels add 0 (not masked out, not bincount: both read the data on the host); counts exact in float32
    counts = labels.new_zeros(B * num_regions * h * w, dtype=torch.float).index_add_(0, index, inside.flatten().float())
    return counts.view(B, num_regions, h * w)


def region_centroids(R: Tensor, labels: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
    """Normalised mean of R inside each region of a label map, computed at R's resolution (see region_weights).

    Args:
        R: [B, C, h, w] features (student R or teacher dense tokens D).
        labels: [B, H, W] long region id in 0..num_regions-1, or any id outside that range (ignored, e.g. 255).
        num_regions: N, regions per image.

    Returns:
        (centroids [B, N, C] L2-normalised, zero for absent regions; present [B, N] bool).
    """
    return weighted_centroids(R, region_weights(labels, num_regions, *R.shape[-2:]))


def weighted_centroids(R: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised weighted mean of R per region: R [B, C, h, w], weights [B, N, h*w] from :func:`region_weights`.

    Returns:
        (centroids [B, N, C] L2-normalised, zero for absent regions; present [B, N] bool).
    """
    weights = weights.to(R.dtype)
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
        self.text_loss = PrototypeTextLoss(syn.loss) if syn.enabled else None

    @torch.no_grad()
    def pseudo_labels(
        self, dense: Tensor, labels: Tensor, num_seen: int, pad: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """F from multi-scale K-Means on the teacher's dense tokens, fused and merged with the seen labels.

        Runs in float32 with autocast off: cluster assignments are argmaxes of near-equal cosines.

        Args:
            dense: [B, C, h', w'] teacher dense tokens (normalised).
            labels: [B, H, W] seen ids in 0..Ns-1 or 255.
            num_seen: Ns.
            pad: [B, H, W] bool, True on crop padding (never a potential class); None = no padding.

        Returns:
            (F [B, H, W], report of detached scalars).
        """
        km = self.cfg.kmeans
        with torch.autocast(device_type=dense.device.type, enabled=False):
            result = multiscale_kmeans(dense.float(), km.scales, km.iters)
            assign, num_clusters, _ = fuse_clusters(result, km.fuse_threshold, km.fusion)
        clusters = assign.view(-1, *result.grid)  # [B, h', w']
        bound = total_clusters(result.grid, km.scales)
        fused = fused_labels(labels, clusters, num_seen, km.drop_seen_ratio, pad, num_clusters=bound)
        unlabelled = labels == IGNORE_INDEX
        if pad is not None:
            unlabelled &= ~pad
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
        self,
        R: Tensor,
        teacher: TeacherOutput,
        labels: Tensor,
        seen_text: Tensor,
        alpha: Tensor,
        beta: Tensor,
        pad: Tensor | None = None,
    ) -> PLMOutput:
        """Pseudo labels, prototypes of every region, the text loss and the potential-class logits.

        Args:
            R: [B, C, h, w] student features (normalised).
            teacher: .cls [B, C] and .dense [B, C, h', w'] (normalised).
            labels: [B, H, W] seen ids in 0..Ns-1 or 255.
            seen_text: [Ns, C] normalised seen-class text embeddings.
            alpha: logit scale of the seen prototype-text logits in the text loss.
            beta: scale of cos(R, P_pseudo).
            pad: [B, H, W] bool crop padding, or None.

        Returns:
            See :class:`PLMOutput`.
        """
        num_seen = seen_text.shape[0]
        fused, report = self.pseudo_labels(teacher.dense, labels, num_seen, pad)
        # Kp = K, the clusters' bound from the shapes, not the batch's count: a count would be read on the host every
        # step; the channels no image uses are absent (potential_valid False), so the losses are the same
        num_regions = num_seen + total_clusters(teacher.dense.shape[-2:], self.cfg.kmeans.scales)
        from_teacher = self.cfg.synthesizer.query == "teacher"
        source = teacher.dense.to(R.dtype) if from_teacher else R
        weights = region_weights(fused, num_regions, *source.shape[-2:])  # [B, Ns+Kp, L]
        centroids, present = weighted_centroids(source, weights)  # [B, Ns+Kp, C], [B, Ns+Kp]
        text_loss = None
        if self.synthesizer is not None:
            mask = weights > 0 if from_teacher else None  # the query's own dense tokens: the grid of the weights
            prototypes = self.synthesizer(centroids, present, teacher.cls, teacher.dense, mask)
            text_loss = self.text_loss(prototypes[:, :num_seen], present[:, :num_seen], seen_text, alpha)
            pseudo = prototypes[:, num_seen:]  # [B, Kp, C]
            if from_teacher:  # trained by its text loss only: CE would pull the weights towards the student
                pseudo = pseudo.detach()
        else:
            pseudo = centroids[:, num_seen:]
        logits = beta * torch.einsum("bchw,bkc->bkhw", F.normalize(R, dim=1), pseudo)  # [B, Kp, h, w]
        return PLMOutput(fused, logits, present[:, num_seen:], pseudo, text_loss, report)
