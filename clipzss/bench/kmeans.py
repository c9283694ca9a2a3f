"""Figure 1: batched multi-scale K-Means against scikit-learn and faiss, and where it sits on this machine's roofline.

All three cluster the same tokens from the same seeds with the same iteration cap (cosine K-Means: faiss with
``spherical=True``; scikit-learn's Euclidean Lloyd on unit vectors, the centroids renormalised for the inertia).
The libraries run once per image and scale, as a user would call them; ours runs every image and scale at once.

Throughput counts only the work done: per Lloyd step one assignment product [B, K, C] x [B, C, L] (2 B K C L flops)
and one sparse update (2 B S L C flops: each token adds into one centroid per scale). The roofline part measures the
assignment product alone at its exact shape: its arithmetic intensity against the machine balance (matmul GFLOP/s
over copy GB/s) says whether memory can be the limit, and its own GFLOP/s is the ceiling K-Means can reach.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipzss.bench.timing import MIN_REPEATS, interleaved, matmul_call
from clipzss.method.kmeans import KMeansResult, _offsets, _update, kmeans_seeds, multiscale_kmeans

ITERATION_STEPS = ("assign_product", "argmax", "update")


def clustered_tokens(batch: int, grid: int, dim: int) -> torch.Tensor:
    """D [B, C, h, w]: a few directions plus noise per image, like real dense CLIP tokens (not isotropic noise)."""
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(batch, 12, dim), dim=-1)
    pick = torch.randint(0, 12, (batch, grid * grid))
    noise = torch.randn(batch, grid * grid, dim) * (0.8 / dim**0.5)  # noise norm ~0.8 against unit centres
    tokens = F.normalize(centres[torch.arange(batch)[:, None], pick] + noise, dim=-1)
    return tokens.transpose(1, 2).reshape(batch, dim, grid, grid).contiguous()


def cosine_inertia(tokens: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> float:
    """Sum over tokens of 1 - cos(token, its centroid); tokens [L, C] unit rows."""
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return float((1 - (tokens * unit[assign]).sum(1)).sum())


def sklearn_fit(X: np.ndarray, seeds: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    fit = KMeans(n_clusters=seeds.shape[0], init=seeds, n_init=1, max_iter=iters, algorithm="lloyd").fit(X)
    return fit.cluster_centers_, fit.labels_


def faiss_fit(X: np.ndarray, seeds: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())  # as many threads as torch gets
    X = np.ascontiguousarray(X, dtype=np.float32)
    km = faiss.Kmeans(X.shape[1], seeds.shape[0], niter=iters, spherical=True, min_points_per_centroid=1)
    km.train(X, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))
    _, labels = km.index.search(X, 1)
    return km.centroids, labels[:, 0]


def _library_call(fit, X: np.ndarray, seeds: list[np.ndarray], iters: int) -> tuple[Callable[[], object], float]:
    """(a call fitting every image and scale once, the mean cosine inertia of those clusterings)."""
    runs = [(b, s) for b in range(X.shape[0]) for s in range(len(seeds))]
    inertia = [cosine_inertia(X[b], *fit(X[b], seeds[s][b], iters)) for b, s in runs]
    return (lambda: [fit(X[b], seeds[s][b], iters) for b, s in runs]), float(np.mean(inertia))


def roofline_calls(D: torch.Tensor, result: KMeansResult) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """The calls the roofline times beside K-Means, and the work of each (flops, or bytes for the copy).

    ``assign_product``: [B, K, C] x [B, C, L] alone at its exact shape; ``argmax`` and ``update``: the other two
    steps of one Lloyd iteration, alone (the per-scale argmax of that product, the sparse centroid update);
    ``matmul``: a square matmul (the peak); ``copy``: 128 MiB into touched memory (no page faults timed).
    """
    B, C, h, w = D.shape
    L = h * w
    sizes = [c.shape[1] for c in result.centroids]
    centroids, Xt = torch.cat(result.centroids, dim=1), D.flatten(2)
    similarity = torch.bmm(centroids, Xt)  # [B, K, L]
    assign = torch.stack([a + o for a, o in zip(result.assignments, _offsets(sizes), strict=True)])  # [S, B, L]
    source, target = torch.ones(32 * 2**20, device=D.device), torch.zeros(32 * 2**20, device=D.device)
    matmul, matmul_flops = matmul_call(D.device)
    calls = {
        "assign_product": lambda: torch.bmm(centroids, Xt),
        "argmax": lambda: [part.max(1) for part in similarity.split(sizes, dim=1)],
        "update": lambda: _update(result.tokens, centroids, assign),
        "matmul": matmul,
        "copy": lambda: target.copy_(source),
    }
    work = {"assign_product": 2.0 * B * sum(sizes) * C * L, "matmul": matmul_flops, "copy": 2.0 * source.numel() * 4}
    return calls, work


def bench_kmeans(
    device: torch.device,
    batch: int = 8,
    grid: int = 32,
    dim: int = 512,
    scales: tuple[int, ...] = (4, 8, 16),
    iters: int = 10,
    libraries: tuple[str, ...] = ("sklearn", "faiss"),
    repeat: int = MIN_REPEATS,
) -> dict[str, float]:
    """Figure 1 (defaults: the PLM's shape at 512 px, a batch of 8); a library that is not installed is skipped.

    K-Means, the libraries and the roofline's calls are timed interleaved, so every ratio is of the same run.
    """
    D = clustered_tokens(batch, grid, dim).to(device)
    result = multiscale_kmeans(D, scales, iters)
    k = sum(c.shape[1] for c in result.centroids)
    L = grid * grid
    flops = 2 * batch * k * dim * L * (iters + 1) + 2 * batch * len(scales) * L * dim * iters
    calls, work = roofline_calls(D, result)
    calls["kmeans"] = lambda: multiscale_kmeans(D, scales, iters)
    inertia = {"kmeans": float(result.inertia.mean().cpu())}  # mean over images and scales, as the libraries'
    X = D.flatten(2).transpose(1, 2).double().cpu().numpy()  # [B, L, C]
    seeds = [kmeans_seeds(D.cpu(), s).double().numpy() for s in scales]
    fits = {"sklearn": sklearn_fit, "faiss": faiss_fit}
    for name in libraries:
        try:
            calls[name], inertia[name] = _library_call(fits[name], X, seeds, iters)
        except ImportError:
            print(f"    ({name} is not installed: its column is skipped)")
    t = interleaved(calls, device, repeat)
    peak = work["matmul"] / t["matmul"].median_ms / 1e6  # GFLOP/s
    figures = t["kmeans"].columns("kmeans_")
    figures |= {
        "kmeans_inertia": inertia["kmeans"],
        "kmeans_gflop_per_s": flops / t["kmeans"].median_ms / 1e6,
        "matmul_gflop_per_s": peak,
        "fraction_of_peak": flops / t["kmeans"].median_ms / 1e6 / peak,
    }
    for name in libraries:
        if name in t:
            figures |= t[name].columns(f"{name}_") | {f"{name}_inertia": inertia[name]}
            figures[f"speedup_vs_{name}"] = t[name].median_ms / t["kmeans"].median_ms
            figures[f"inertia_ratio_vs_{name}"] = inertia["kmeans"] / inertia[name]
    B, C = batch, dim
    bandwidth = work["copy"] / t["copy"].median_ms / 1e6  # GB/s
    product = work["assign_product"] / t["assign_product"].median_ms / 1e6
    figures |= {
        "assign_product_flop_per_byte": work["assign_product"] / (4 * B * (k * C + C * L + k * L)),
        "machine_balance_flop_per_byte": peak / bandwidth,
        "memory_gb_per_s": bandwidth,
        "assign_product_gflop_per_s": product,
        "assign_product_fraction_of_peak": product / peak,
        "fraction_of_assign_product": figures["kmeans_gflop_per_s"] / product,
    }
    iteration = sum(t[step].median_ms for step in ITERATION_STEPS)
    for step in ITERATION_STEPS:  # where one Lloyd iteration's time goes: the step that keeps K-Means off the peak
        figures |= t[step].columns(f"step/{step}_") | {f"step/{step}_share": t[step].median_ms / iteration}
    return figures
