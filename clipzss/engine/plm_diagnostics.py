"""PLM diagnostics: how good are the pseudo labels and the pseudo weights, measured against full ground truth.

Training never sees unseen labels. These numbers do, for diagnosis only (never in a loss): a few validation images
are given to the PLM exactly as training images would be (unseen pixels set to 255), and its output is compared
with their full labels:
    coverage          fraction of the unseen-class pixels that received a potential class
    purity            fraction of the potential pixels with ground truth (not 255) that carry their potential
                      class's majority class
    background        fraction of the potential pixels that have no ground truth (255: background or boundary)
    potential_classes potential classes per image
    unseen_rank       for each potential class whose majority class is unseen: the rank (1 = best) of that class's
                      text among every class text, by cosine to the potential class's pseudo weight
    unseen_top1       fraction of those ranks equal to 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from clipzss.method.pseudo_labels import IGNORE_INDEX

if TYPE_CHECKING:
    from clipzss.data.datasets import SegmentationDataset
    from clipzss.method.objective import CLIPZSSObjective


def pseudo_label_counts(
    fused: Tensor, truth: Tensor, num_seen: int, unseen: Tensor, pseudo: Tensor, text: Tensor
) -> dict[str, float]:
    """Counts of one image (summed over images by the caller, then turned into ratios).

    Args:
        fused: [H, W] F: seen ids 0..Ns-1, potential ids Ns..Ns+Kp-1, or 255.
        truth: [H, W] full labels in 0..N-1 (every class) or 255.
        num_seen: Ns.
        unseen: [N] bool, True for the unseen classes.
        pseudo: [Kp', C] pseudo weights (normalised), Kp' >= the image's potential classes.
        text: [N, C] normalised text of every class.

    Returns:
        Sums: unseen pixels, covered unseen pixels, potential pixels, those with truth, majority pixels, potential
        classes, and for potential classes of unseen majority: their number, sum of ranks, number at rank 1.
    """
    N = text.shape[0]
    potential = (fused >= num_seen) & (fused != IGNORE_INDEX)
    is_unseen = (truth != IGNORE_INDEX) & unseen[truth.clamp(max=N - 1)]
    with_truth = potential & (truth != IGNORE_INDEX)
    counts = {
        "unseen": float(is_unseen.sum()),
        "covered": float((is_unseen & potential).sum()),
        "potential": float(potential.sum()),
        "with_truth": float(with_truth.sum()),
        "majority": 0.0,
        "classes": 0.0,
        "named": 0.0,
        "rank_sum": 0.0,
        "top1": 0.0,
    }
    if not potential.any():
        return counts
    kp = int(fused[potential].max()) + 1 - num_seen
    table = torch.zeros(kp, N, dtype=torch.long, device=fused.device)  # [Kp, N] pixels per (potential class, truth)
    table.index_put_((fused[with_truth] - num_seen, truth[with_truth]), torch.ones_like(truth[with_truth]), True)
    majority = table.argmax(1)  # [Kp]
    named = (table.sum(1) > 0) & unseen[majority]  # potential classes whose majority class is unseen
    scores = pseudo[:kp].float() @ text.float().t()  # [Kp, N]
    rank = (scores > scores.gather(1, majority[:, None])).sum(1) + 1  # [Kp], 1 = the right text is nearest
    counts.update(
        majority=float(table.max(1).values.sum()),
        classes=float(kp),
        named=float(named.sum()),
        rank_sum=float(rank[named].sum()),
        top1=float((rank[named] == 1).sum()),
    )
    return counts


@torch.no_grad()
def plm_diagnostics(
    objective: CLIPZSSObjective,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    dataset: SegmentationDataset,
    text: Tensor,
    device: torch.device,
    num_images: int = 16,
) -> dict[str, float]:
    """The module docstring's figures over the first ``num_images`` images of a validation dataset.

    Args:
        objective: with a PLM (``objective.plm`` not None); its seen text must be the dataset's seen classes.
        student, teacher: the networks being trained (the student is put back in its training mode).
        dataset: validation images with full labels (``dataset.split`` gives the seen / unseen partition).
        text: [N, C] text of every class of the dataset.
        device: where the networks are.
        num_images: images used (one at a time: validation images may differ in size).

    Returns:
        Flat ``plm/...`` scalars; a ratio without pixels or classes to count is left out.
    """
    split = dataset.split
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long, device=device)  # full id -> seen id, unseen -> 255
    lut[split.seen_ids] = torch.arange(len(split.seen_ids), device=device)
    unseen = torch.zeros(len(split.classes), dtype=torch.bool, device=device)
    unseen[dataset.unseen_ids] = True
    text = torch.nn.functional.normalize(text.to(device).float(), dim=-1)
    alpha, beta = objective.scales()
    was_training = student.training
    student.eval()
    totals: dict[str, float] = {}
    count = min(num_images, len(dataset))
    for index in range(count):
        item = dataset[index]
        image, truth = item["image"][None].to(device), item["label"].to(device)
        seen_labels = lut[truth.clamp(max=255)][None]  # [1, H, W] as training would see it
        out = objective.plm(student(image), teacher(image), seen_labels, objective.seen_text, alpha, beta)
        counts = pseudo_label_counts(out.labels[0], truth, len(split.seen_ids), unseen, out.pseudo[0], text)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0.0) + value
    student.train(was_training)

    def ratio(a: str, b: str) -> float:
        return totals[a] / totals[b] if totals.get(b) else float(np.nan)

    figures = {
        "plm/coverage": ratio("covered", "unseen"),
        "plm/purity": ratio("majority", "with_truth"),
        "plm/background": 1 - ratio("with_truth", "potential"),
        "plm/potential_classes": totals.get("classes", 0.0) / max(count, 1),
        "plm/unseen_rank": ratio("rank_sum", "named"),
        "plm/unseen_top1": ratio("top1", "named"),
    }
    return {key: value for key, value in figures.items() if np.isfinite(value)}
