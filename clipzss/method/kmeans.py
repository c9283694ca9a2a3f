"""Multi-scale cosine K-Means on the teacher's dense tokens (docs/pages/method.md, PLM part 1, steps 1-2).

Every image and every scale is clustered at once: the centroids of all scales are concatenated into one
[B, K, C] tensor (K = sum of K_s), so each Lloyd iteration is one batched product D^T [B, L, C] x [B, C, K].
A token is assigned only among its own scale's centroids by taking the argmax inside each scale's slice of K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@dataclass
class KMeansResult:
    """Clusters of every scale for a batch of token grids.

    Attributes:
        tokens: [B, L, C] the clustered tokens (L = h*w, raster order), as given (normalised).
        grid: (h, w) of the token grid.
        scales: the window sizes, one per scale.
        centroids: per scale, [B, K_s, C] normalised centroids.
        assignments: per scale, [B, L] cluster id in 0..K_s-1 of each token.
        inertia: [B, S] per image and scale, the sum over tokens of 1 - cos(token, its centroid).
        iterations: Lloyd iterations run (always the number asked: count products with it).
    """

    tokens: Tensor
    grid: tuple[int, int]
    scales: tuple[int, ...]
    centroids: list[Tensor]
    assignments: list[Tensor]
    inertia: Tensor
    iterations: int


def kmeans_seeds(D: Tensor, scale: int) -> Tensor:
    """Seeds of one scale: D average-pooled with window and stride ``scale``, renormalised.

    A grid not divisible by ``scale`` gets one more, partial window at its bottom/right edge (``ceil_mode``; the
    partial window averages only the tokens inside the grid), so K_s = ceil(h / scale) * ceil(w / scale).

    Args:
        D: [B, C, h, w] normalised tokens.
        scale: window size in tokens.

    Returns:
        [B, K_s, C] normalised seeds, windows in raster order.
    """
    pooled = F.avg_pool2d(D, scale, scale, ceil_mode=True)
    return F.normalize(rearrange(pooled, "b c y x -> b (y x) c"), dim=-1)


def total_clusters(grid: tuple[int, int], scales: Sequence[int]) -> int:
    """K = sum_s K_s of :func:`multiscale_kmeans` on an h x w grid: a bound on every cluster count after it."""
    h, w = grid
    return sum(-(-h // s) * -(-w // s) for s in scales)


def multiscale_kmeans(D: Tensor, scales: Sequence[int], iters: int) -> KMeansResult:
    """Cosine K-Means from multi-scale window seeds, all images and scales batched.

    Tokens are assigned to the centroid of highest dot product within their scale; one iteration moves each
    centroid to the renormalised mean of its tokens (an empty cluster keeps its centroid) and assigns again. Every
    iteration runs, even past a fixed point (where it changes nothing): testing for one would read a tensor on the
    host each iteration, a sync that stalls a GPU queue and breaks CUDA graphs and ``torch.compile(fullgraph=True)``.

    Args:
        D: [B, C, h, w] teacher dense tokens, L2-normalised over C (not renormalised here).
        scales: window sizes in tokens, e.g. (4, 8, 16); K_s = ceil(h / s) * ceil(w / s).
        iters: number of Lloyd iterations (0 = the seeds' own assignment).

    Returns:
        The clusters of every scale, see :class:`KMeansResult`.
    """
    if not scales:
        raise ValueError("multiscale_kmeans: scales is empty (config plm.kmeans.scales needs at least one window)")
    B, C, h, w = D.shape
    D_last = D.contiguous(memory_format=torch.channels_last)  # a no-op for tokens reshaped from [B, L, C]
    X = D_last.permute(0, 2, 3, 1).reshape(B, h * w, C)  # [B, L, C] token rows (a view of D_last)
    Xt = D.flatten(2) if D.is_contiguous() else X.transpose(1, 2)  # [B, C, L]; the product is fastest on it
    seeds = [kmeans_seeds(D_last, s) for s in scales]  # pooling is ~3x faster channels-last
    sizes = [k.shape[1] for k in seeds]
    centroids = torch.cat(seeds, dim=1)  # [B, K, C], K = sum_s K_s
    assign, best = _assign(Xt, centroids, sizes)  # [S, B, L] ids into K, [S, B, L] cosines
    for _ in range(iters):
        centroids = _update(X, centroids, assign)
        assign, best = _assign(Xt, centroids, sizes)
    return KMeansResult(
        tokens=X,
        grid=(h, w),
        scales=tuple(scales),
        centroids=list(centroids.split(sizes, dim=1)),
        assignments=[ids - o for ids, o in zip(assign, _offsets(sizes), strict=True)],
        inertia=(1 - best).sum(-1).T,  # [B, S]
        iterations=iters,
    )


def _assign(Xt: Tensor, centroids: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Per scale, the argmax centroid of each token.

    Args:
        Xt: [B, C, L] tokens; centroids: [B, K, C]; sizes: K_s of each scale (K = sum).

    Returns:
        ([S, B, L] ids into K, [S, B, L] the cosine to that centroid).
    """
    sim = torch.bmm(centroids, Xt)  # [B, K, L]: every scale in one product
    ids, best = [], []
    for part, offset in zip(sim.split(sizes, dim=1), _offsets(sizes), strict=True):
        value, index = part.max(1)  # ties: the first (lowest) id
        ids.append(index + offset)
        best.append(value)
    return torch.stack(ids), torch.stack(best)


def _update(X: Tensor, centroids: Tensor, assign: Tensor) -> Tensor:
    """Renormalised mean of each cluster's tokens; an empty cluster keeps its centroid.

    The sums are one sparse product M X, M the [B*K, B*L] 0/1 assignment matrix (S nonzeros per token): L*S*C
    multiply-adds instead of the dense one-hot product's L*K*C. On 2 CPU cores this measured about twice as fast
    as the dense product, and unlike ``scatter_add_`` it does not collapse when the cores are shared.

    Args:
        X: [B, L, C] token rows (contiguous); centroids: [B, K, C];
            assign: [S, B, L] ids into K (scales use disjoint ids).
    """
    B, L, C = X.shape
    K = centroids.shape[1]
    rows = (assign + K * torch.arange(B, device=X.device)[:, None]).flatten()  # [S*B*L] ids into B*K
    cols = torch.arange(B * L, device=X.device).repeat(assign.shape[0])  # token of each nonzero
    ones = X.new_ones(rows.shape[0])
    M = torch.sparse_coo_tensor(torch.stack([rows, cols]), ones, (B * K, B * L), check_invariants=False)
    sums = torch.sparse.mm(M, X.reshape(B * L, C)).view(B, K, C)
    counts = X.new_zeros(B * K).index_add_(0, rows, ones).view(B, K, 1)  # not bincount: it syncs on a GPU
    return torch.where(counts > 0, F.normalize(sums, dim=-1), centroids)


def _offsets(sizes: list[int]) -> list[int]:
    """Start of each scale's slice of K."""
    return [sum(sizes[:i]) for i in range(len(sizes))]
