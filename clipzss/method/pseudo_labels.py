"""Mask fusion across scales and the fused label map F (docs/pages/method.md, PLM part 1, steps 3-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipzss.method.kmeans import KMeansResult

IGNORE_INDEX = 255


def fuse_clusters(result: KMeansResult, threshold: float, mode: str = "merge") -> tuple[Tensor, Tensor, Tensor]:
    """Fuse similar clusters of different scales, then give every token one cluster of the fused set.

    ``mode="merge"`` (the default): centroids of DIFFERENT scales with cosine > ``threshold`` (lambda) are
    linked, and each connected group merges into one cluster (centroid = renormalised mean of its members; its mask,
    before re-assignment, the union of theirs). The fused set is the merged centroids plus the unmerged centroids
    of the finest scale (the one with the most clusters); unmerged coarser centroids are left out, so lambda and
    the scale set change the clusters. ``mode="pairs"`` is the literal reading: greedy one-to-one pairs in order of
    decreasing similarity, and every unfused centroid of every scale stays in the set (fusion then changes nothing).

    Each token goes to its argmax centroid in the fused set; clusters left without tokens are removed and the rest
    re-indexed compactly, in slot order (the lowest member id of each cluster).

    Args:
        result: multi-scale K-Means clusters (tokens [B, L, C], centroids per scale [B, K_s, C]).
        threshold: lambda, the cosine above which two centroids of different scales are fused.
        mode: "merge" or "pairs" (``plm.kmeans.fusion``).

    Returns:
        (assign [B, L] fused-cluster id in 0..K_f-1 of each token, num_clusters [B] = K_f per image,
        centroids [B, K, C] of the fused clusters, rows >= K_f zero). Shapes depend only on K, never on the data,
        so the "merge" mode runs without reading a tensor on the host.
    """
    cents = torch.cat(result.centroids, dim=1)  # [B, K, C], K = sum_s K_s
    B, K, C = cents.shape
    scale_of = torch.cat([torch.full((c.shape[1],), i, device=cents.device) for i, c in enumerate(result.centroids)])
    if mode == "merge":
        sizes = [c.shape[1] for c in result.centroids]
        fused, slot_valid = _merge(cents, scale_of, sizes.index(max(sizes)), threshold)
    elif mode == "pairs":
        fused, slot_valid = _greedy_pairs(cents, scale_of, threshold)
    else:
        raise ValueError(f"plm.kmeans.fusion: unknown mode {mode!r}; allowed: merge, pairs")

    tokens_sim = torch.bmm(result.tokens, fused.transpose(1, 2))  # [B, L, K]
    assign = tokens_sim.masked_fill(~slot_valid[:, None, :], float("-inf")).argmax(-1)  # [B, L]
    counts = torch.zeros(B, K, dtype=torch.long, device=cents.device).scatter_add_(1, assign, torch.ones_like(assign))
    keep = counts > 0  # [B, K]
    new_id = keep.cumsum(1) - 1  # compact ids of kept slots
    target = torch.where(keep, new_id, K)[..., None].expand(-1, -1, C)  # dropped slots all write the spare row K
    out = cents.new_zeros(B, K + 1, C).scatter_(1, target, fused)[:, :K]
    return new_id.gather(1, assign), keep.sum(1), out


def _merge(cents: Tensor, scale_of: Tensor, finest: int, threshold: float) -> tuple[Tensor, Tensor]:
    """Connected groups of cross-scale links above ``threshold``: (centroids [B, K, C] indexed by each group's lowest
    member id, slot_valid [B, K]: group roots of merged groups and unmerged centroids of scale ``finest``).

    The groups come from the transitive closure of the links by repeated squaring (log2 K products of [K, K]), so
    the number of rounds is known without reading the links on the host."""
    B, K, _ = cents.shape
    sim = torch.bmm(cents, cents.transpose(1, 2))  # [B, K, K]
    eye = torch.eye(K, dtype=torch.bool, device=cents.device)
    reach = (((sim > threshold) & (scale_of[:, None] != scale_of[None, :])) | eye).to(cents.dtype)  # [B, K, K]
    for _ in range(max(K - 1, 1).bit_length()):  # squaring doubles the path length covered: K - 1 links suffice
        reach = (torch.bmm(reach, reach) > 0).to(cents.dtype)
    root = reach.argmax(-1)  # [B, K] the lowest member of each centroid's connected group (first 1 of its row)
    member = root[:, None, :] == torch.arange(K, device=cents.device)[None, :, None]  # [B, K groups, K members]
    fused = F.normalize(torch.bmm(member.to(cents.dtype), cents), dim=-1)  # [B, K, C] (rows of non-roots unused)
    size = member.sum(-1)  # [B, K]
    is_root = root == torch.arange(K, device=cents.device)
    return fused, is_root & ((size > 1) | (scale_of == finest))


def _greedy_pairs(cents: Tensor, scale_of: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Greedy one-to-one fusion (old mode): (centroids [B, K, C] of each slot, slot_valid [B, K]: one slot per fused
    pair, at its lower id, and every unfused centroid of every scale).

    The similarities are batched; only the matching loops, per image, over the candidate pairs above the threshold
    (on CPU lists, not over pixels): unlike "merge", this mode reads tensors on the host."""
    B, K, C = cents.shape
    sim = torch.bmm(cents, cents.transpose(1, 2))  # [B, K, K]
    first, second = torch.triu_indices(K, K, offset=1, device=cents.device)
    cross = scale_of[first] != scale_of[second]
    first, second = first[cross], second[cross]  # [P] candidate pairs of different scales
    pair_sim = sim[:, first, second]  # [B, P]
    order = pair_sim.argsort(dim=1, descending=True, stable=True)
    above = (pair_sim.gather(1, order) > threshold).sum(1).tolist()
    order, first, second = order.tolist(), first.tolist(), second.tolist()

    # partner[b, k] = the centroid fused with k (k itself when unfused); the fused set is {(k, partner) : k <= partner}
    partner = [list(range(K)) for _ in range(B)]
    for b in range(B):
        for p in order[b][: above[b]]:
            i, j = first[p], second[p]
            if partner[b][i] == i and partner[b][j] == j:  # neither used yet
                partner[b][i], partner[b][j] = j, i
    partner = torch.tensor(partner, device=cents.device)  # [B, K]
    slot_valid = partner >= torch.arange(K, device=cents.device)  # one slot per fused pair (lower id) or unfused
    fused = F.normalize(cents + cents.gather(1, partner[..., None].expand(-1, -1, C)), dim=-1)  # mean, renormalised
    return fused, slot_valid


def fused_labels(
    seen_labels: Tensor,
    clusters: Tensor,
    num_seen: int,
    drop_seen_ratio: float,
    pad: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_clusters: int | None = None,
) -> Tensor:
    """The fused label map F: seen labels where annotated, potential-class ids on the ignore pixels.

    The cluster map is upsampled (nearest) to the label size. Per image, a cluster whose pixels are mostly
    (fraction > ``drop_seen_ratio``) seen-labelled, or that has no ignore pixel, is dropped and its ignore pixels
    stay ``ignore_index``; the kept clusters are re-indexed compactly (in cluster-id order) and their ignore
    pixels take ``num_seen + new id``.

    Args:
        seen_labels: [B, H, W] long, seen class id in 0..Ns-1 or ``ignore_index``.
        clusters: [B, h, w] long, cluster id per token (0..K-1).
        num_seen: Ns.
        drop_seen_ratio: the seen-pixel fraction above which a cluster is dropped.
        pad: [B, H, W] bool, True on crop padding (None: no padding).
        ignore_index: the ignore label (255).
        num_clusters: a bound K on the cluster ids (all < K), known from the shapes; None reads it from ``clusters``
            (a host sync: the training step passes the bound).

    Returns:
        [B, H, W] long: F, in 0..Ns-1 (seen), Ns..Ns+Kp-1 (potential, Kp kept clusters of that image) or ignore.
    """
    B, H, W = seen_labels.shape
    up = F.interpolate(clusters[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()  # [B, H, W]
    K = int(clusters.max()) + 1 if num_clusters is None else num_clusters
    inside = torch.ones_like(seen_labels, dtype=torch.bool) if pad is None else ~pad
    ignored = (seen_labels == ignore_index) & inside
    flat = (up + K * torch.arange(B, device=up.device)[:, None, None]).flatten()  # ids into B*K
    pixels = torch.stack([inside, ignored]).flatten(1).float()  # [2, B*H*W]
    counts = up.new_zeros(2, B * K, dtype=torch.float).index_add_(1, flat, pixels)
    total, unlabelled = counts.view(2, B, K)  # pixel counts (exact in float32); no bincount: it syncs on a GPU
    seen_fraction = (total - unlabelled) / total.clamp_min(1)
    keep = (unlabelled > 0) & (seen_fraction <= drop_seen_ratio)  # [B, K]
    new_id = keep.cumsum(1) - 1
    kept = keep.gather(1, up.flatten(1)).view(B, H, W)
    potential = num_seen + new_id.gather(1, up.flatten(1)).view(B, H, W)
    return torch.where(
        ignored, torch.where(kept, potential, ignore_index), seen_labels.masked_fill(~inside, ignore_index)
    )
