"""Batched multi-scale cosine K-Means against a plain per-image, per-scale loop."""

import pytest
import torch
import torch.nn.functional as F

from clipzss.method import kmeans
from clipzss.method.kmeans import multiscale_kmeans

update = kmeans._update


def kmeans_reference(D: torch.Tensor, scales, iters: int):
    """Plain loops: per image, per scale, seeds from explicit windows, Lloyd with renormalised means."""
    B, C, h, w = D.shape
    out = []  # per image: list over scales of (centroids [K, C], assign [L], inertia)
    for b in range(B):
        X = D[b].flatten(1).T  # [L, C]
        per_scale = []
        for s in scales:
            seeds = [D[b, :, y : y + s, x : x + s].mean(dim=(1, 2)) for y in range(0, h, s) for x in range(0, w, s)]
            cents = F.normalize(torch.stack(seeds), dim=-1)
            for _ in range(iters):
                assign = (X @ cents.T).argmax(1)
                new = cents.clone()
                for k in range(cents.shape[0]):
                    members = X[assign == k]
                    if len(members):
                        new[k] = F.normalize(members.mean(0), dim=0)
                cents = new
            sim = X @ cents.T
            per_scale.append((cents, sim.argmax(1), (1 - sim.max(1).values).sum()))
        out.append(per_scale)
    return out


@pytest.mark.parametrize(
    ("grid", "scales", "iters"), [((8, 8), (2, 4, 8), 5), ((10, 12), (4, 8), 4), ((6, 6), (16,), 3)]
)
def test_matches_per_image_reference_exactly(grid, scales, iters):
    D = F.normalize(torch.randn(3, 16, *grid, dtype=torch.float64), dim=1)
    result = multiscale_kmeans(D, scales, iters)
    reference = kmeans_reference(D, scales, iters)
    assert result.grid == grid and result.inertia.shape == (3, len(scales)) and result.iterations <= iters
    for b in range(3):
        for s, (cents, assign, inertia) in enumerate(reference[b]):
            assert torch.equal(result.assignments[s][b], assign)
            torch.testing.assert_close(result.centroids[s][b], cents)
            torch.testing.assert_close(result.inertia[b, s], inertia)


def test_cluster_counts_follow_the_windows():
    D = F.normalize(torch.randn(2, 8, 10, 12), dim=1)
    result = multiscale_kmeans(D, (4, 8), iters=2)
    assert [c.shape for c in result.centroids] == [(2, 9, 8), (2, 4, 8)]  # K_s = ceil(10 / s) * ceil(12 / s)
    assert all(a.shape == (2, 120) for a in result.assignments)
    assert kmeans.total_clusters(result.grid, (4, 8)) == 9 + 4
    for c in result.centroids:
        torch.testing.assert_close(c.norm(dim=-1), torch.ones(c.shape[:2]))


def test_empty_cluster_keeps_its_centroid():
    D = F.normalize(torch.randn(1, 8, 1, 1), dim=1).expand(1, 8, 8, 8).contiguous()  # every token equal
    D[..., 4:, 4:] = F.normalize(torch.randn(8), dim=0)[:, None, None]  # one window differs
    result = multiscale_kmeans(D, (4,), iters=3)
    seeds = F.normalize(D[0, :, ::4, ::4].flatten(1).T, dim=-1)  # window means of constant windows
    # windows 1 and 2 equal window 0: ties go to the lowest id, so clusters 1 and 2 stay empty and keep their seeds
    assert set(result.assignments[0][0].tolist()) == {0, 3}
    torch.testing.assert_close(result.centroids[0][0], seeds)


def test_empty_scales_is_an_error():
    with pytest.raises(ValueError, match="plm.kmeans.scales"):
        multiscale_kmeans(torch.randn(1, 4, 4, 4), (), iters=1)


def test_runs_past_a_fixed_point_and_channels_last_input_match_reference(monkeypatch):
    # tokens from 3 prototypes in blocks: Lloyd reaches a fixed point long before 20 iterations; the loop runs all
    # 20 anyway (no host read to detect it) and must still equal the reference
    prototypes = F.normalize(torch.randn(2, 3, 16, dtype=torch.float64), dim=-1)
    layout = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(3, 1).repeat_interleave(3, 2)  # [2, 12, 12]
    tokens = prototypes[torch.arange(2)[:, None, None], layout] + 0.2 * torch.randn(2, 12, 12, 16, dtype=torch.float64)
    D = F.normalize(tokens, dim=-1).permute(0, 3, 1, 2)  # [B, C, h, w] view of [B, h, w, C], as a teacher gives it
    updates = []
    monkeypatch.setattr(kmeans, "_update", lambda *a: updates.append(1) or update(*a))
    result = multiscale_kmeans(D, (3, 6), iters=20)
    assert len(updates) == result.iterations == 20
    longer = multiscale_kmeans(D, (3, 6), iters=30)
    assert all(torch.equal(a, b) for a, b in zip(longer.assignments, result.assignments, strict=True))  # fixed
    contiguous = multiscale_kmeans(D.contiguous(), (3, 6), iters=20)
    for b, per_scale in enumerate(kmeans_reference(D, (3, 6), 20)):
        for s, (cents, assign, _) in enumerate(per_scale):
            assert torch.equal(result.assignments[s][b], assign)
            assert torch.equal(contiguous.assignments[s][b], assign)
            torch.testing.assert_close(result.centroids[s][b], cents)
