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

import numpy as np
import torch
import torch.nn.functional as F

from clipzss.bench.timing import matmul_gflops, timeit
from clipzss.method.kmeans import kmeans_seeds, multiscale_kmeans


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


def _library_figures(name: str, fit, X: np.ndarray, seeds: list[np.ndarray], iters: int) -> dict[str, float]:
    """Time ``fit`` per image and scale; mean cosine inertia of its clusterings."""
    batch = X.shape[0]
    runs = [(b, s) for b in range(batch) for s in range(len(seeds))]
    seconds = timeit(lambda: [fit(X[b], seeds[s][b], iters) for b, s in runs], torch.device("cpu"), repeat=3)
    inertia = [cosine_inertia(X[b], *fit(X[b], seeds[s][b], iters)) for b, s in runs]
    return {f"{name}_ms": seconds * 1e3, f"{name}_inertia": float(np.mean(inertia))}


def roofline(D: torch.Tensor, k: int, peak: float) -> dict[str, float]:
    """The assignment product [B, K, C] x [B, C, L] alone: intensity, its GFLOP/s, and the machine balance."""
    B, C, h, w = D.shape
    L = h * w
    centroids, Xt = torch.randn(B, k, C, device=D.device), D.flatten(2)
    flops = 2 * B * k * C * L
    product_s = timeit(lambda: torch.bmm(centroids, Xt), D.device, repeat=10)
    source, target = torch.ones(32 * 2**20, device=D.device), torch.zeros(32 * 2**20, device=D.device)  # 128 MiB
    copy_s = timeit(lambda: target.copy_(source), D.device, repeat=5)  # into touched memory: no page faults timed
    bandwidth = 2 * source.numel() * 4 / copy_s / 1e9  # read + write
    return {
        "assign_product_flop_per_byte": flops / (4 * B * (k * C + C * L + k * L)),
        "machine_balance_flop_per_byte": peak / bandwidth,
        "memory_gb_per_s": bandwidth,
        "assign_product_gflop_per_s": flops / product_s / 1e9,
        "assign_product_fraction_of_peak": flops / product_s / 1e9 / peak,
    }


def bench_kmeans(
    device: torch.device,
    batch: int = 8,
    grid: int = 32,
    dim: int = 512,
    scales: tuple[int, ...] = (4, 8, 16),
    iters: int = 10,
    libraries: tuple[str, ...] = ("sklearn", "faiss"),
) -> dict[str, float]:
    """Figure 1 (defaults: the PLM's shape at 512 px, a batch of 8); a library that is not installed is skipped."""
    D = clustered_tokens(batch, grid, dim).to(device)
    ours = timeit(lambda: multiscale_kmeans(D, scales, iters), device, repeat=5)
    result = multiscale_kmeans(D, scales, iters)
    k = sum(c.shape[1] for c in result.centroids)
    L = grid * grid
    flops = 2 * batch * k * dim * L * (result.iterations + 1) + 2 * batch * len(scales) * L * dim * result.iterations
    peak = matmul_gflops(device)
    figures = {
        "kmeans_ms": ours * 1e3,
        "kmeans_inertia": float(result.inertia.mean().cpu()),  # mean over images and scales, as the libraries'
        "kmeans_gflop_per_s": flops / ours / 1e9,
        "matmul_gflop_per_s": peak,
        "fraction_of_peak": flops / ours / 1e9 / peak,
    }
    X = D.flatten(2).transpose(1, 2).double().cpu().numpy()  # [B, L, C]
    seeds = [kmeans_seeds(D.cpu(), s).double().numpy() for s in scales]
    fits = {"sklearn": sklearn_fit, "faiss": faiss_fit}
    for name in libraries:
        try:
            figures |= _library_figures(name, fits[name], X, seeds, iters)
        except ImportError:
            print(f"    ({name} is not installed: its column is skipped)")
            continue
        figures[f"speedup_vs_{name}"] = figures[f"{name}_ms"] / figures["kmeans_ms"]
        figures[f"inertia_ratio_vs_{name}"] = figures["kmeans_inertia"] / figures[f"{name}_inertia"]
    figures |= roofline(D, k, peak)
    figures["fraction_of_assign_product"] = figures["kmeans_gflop_per_s"] / figures["assign_product_gflop_per_s"]
    return figures
