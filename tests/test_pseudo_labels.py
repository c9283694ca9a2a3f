"""Mask fusion and the fused label map F against plain per-image references."""

import torch
import torch.nn.functional as F

from clipzss.method.kmeans import multiscale_kmeans
from clipzss.method.pseudo_labels import fuse_clusters, fused_labels


def structured_tokens(B: int = 3, C: int = 16, size: int = 8, noise: float = 0.15) -> torch.Tensor:
    """[B, C, size, size] tokens drawn from a few prototypes laid out in blocks, so scales agree."""
    prototypes = F.normalize(torch.randn(B, 4, C), dim=-1)
    layout = torch.randint(0, 4, (B, size // 2, size // 2)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    D = prototypes[torch.arange(B)[:, None, None], layout] + noise * torch.randn(B, size, size, C)
    return F.normalize(D.permute(0, 3, 1, 2), dim=1).contiguous()


def assign_and_compact(tokens, slots):
    """Argmax re-assignment to the slots, then ids of the used slots only: (assign, count, used centroids)."""
    assign = (tokens @ slots.T).argmax(1)
    used = sorted(set(assign.tolist()))
    remap = {old: new for new, old in enumerate(used)}
    return torch.tensor([remap[a] for a in assign.tolist()]), len(used), slots[used]


def fuse_reference(result, threshold):
    """Per image: all cross-scale pairs sorted by similarity, greedy fusion, argmax re-assignment, compaction."""
    cents = torch.cat(result.centroids, dim=1)
    scale_of = [i for i, c in enumerate(result.centroids) for _ in range(c.shape[1])]
    K = cents.shape[1]
    outputs = []
    for b in range(cents.shape[0]):
        c = cents[b]
        sim = c @ c.T
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if scale_of[i] != scale_of[j]]
        pairs = sorted(pairs, key=lambda p: -sim[p].item())
        partner = list(range(K))
        for i, j in pairs:
            if sim[i, j] > threshold and partner[i] == i and partner[j] == j:
                partner[i], partner[j] = j, i
        slots = [F.normalize((c[k] + c[partner[k]]) / 2, dim=0) for k in range(K) if partner[k] >= k]
        outputs.append(assign_and_compact(result.tokens[b], torch.stack(slots)))
    return outputs


def test_fusion_matches_reference_and_fuses():
    D = structured_tokens()
    result = multiscale_kmeans(D, (2, 4, 8), iters=3)
    assign, num, cents = fuse_clusters(result, threshold=0.8, mode="pairs")
    total = sum(c.shape[1] for c in result.centroids)
    fused_any = False
    for b, (ref_assign, ref_num, ref_cents) in enumerate(fuse_reference(result, 0.8)):
        assert torch.equal(assign[b], ref_assign)
        assert num[b] == ref_num
        torch.testing.assert_close(cents[b, :ref_num], ref_cents)
        assert torch.all(cents[b, ref_num:] == 0)
        fused_any |= ref_num < total
    assert fused_any
    assert cents.shape[1] == total  # a shape known without reading the data (rows past each image's count: zero)


def test_single_scale_only_compacts_empty_clusters():
    D = structured_tokens(B=2)
    result = multiscale_kmeans(D, (2,), iters=3)
    assign, num, _ = fuse_clusters(result, threshold=0.0)  # one scale: nothing to merge, every centroid is finest
    for b in range(2):
        used = sorted(set(result.assignments[0][b].tolist()))
        assert num[b] == len(used)
        expected = torch.tensor([used.index(a) for a in result.assignments[0][b].tolist()])
        assert torch.equal(assign[b], expected)


def merge_reference(result, threshold):
    """Per image: union-find over cross-scale links above the threshold; merged groups + unmerged finest centroids."""
    cents = torch.cat(result.centroids, dim=1)
    scale_of = [i for i, c in enumerate(result.centroids) for _ in range(c.shape[1])]
    finest = max(range(len(result.centroids)), key=lambda i: result.centroids[i].shape[1])
    K = cents.shape[1]
    outputs = []
    for b in range(cents.shape[0]):
        parent = list(range(K))

        def find(k, parent=parent):
            while parent[k] != k:
                k = parent[k]
            return k

        sim = cents[b] @ cents[b].T
        for i in range(K):
            for j in range(i + 1, K):
                if scale_of[i] != scale_of[j] and sim[i, j] > threshold:
                    a, c = sorted((find(i), find(j)))
                    parent[c] = a
        groups = {}
        for k in range(K):
            groups.setdefault(find(k), []).append(k)
        slots = [F.normalize(cents[b, g].sum(0), dim=0) for _, g in sorted(groups.items())
                 if len(g) > 1 or scale_of[g[0]] == finest]  # fmt: skip
        outputs.append(assign_and_compact(result.tokens[b], torch.stack(slots)))
    return outputs


def test_merge_matches_reference():
    D = structured_tokens(B=4)
    result = multiscale_kmeans(D, (2, 4, 8), iters=3)
    for threshold in (0.5, 0.8, 0.95):
        assign, num, cents = fuse_clusters(result, threshold, mode="merge")
        for b, (ref_assign, ref_num, ref_cents) in enumerate(merge_reference(result, threshold)):
            assert torch.equal(assign[b], ref_assign)
            assert num[b] == ref_num
            torch.testing.assert_close(cents[b, :ref_num], ref_cents)


def test_lambda_and_scales_change_the_merged_clusters():
    """The amended fusion is not a no-op: lambda changes the cluster count, and so does the scale set."""
    D = structured_tokens(B=4, noise=0.3)
    result = multiscale_kmeans(D, (2, 4), iters=5)
    counts = [fuse_clusters(result, t, mode="merge")[1].float().mean().item() for t in (0.3, 0.7, 0.99)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] == multiscale_kmeans(D, (2,), iters=5).centroids[0].shape[1]  # nothing merged: the finest K
    finest_only = fuse_clusters(multiscale_kmeans(D, (2,), iters=5), 0.7, mode="merge")[1]
    assert not torch.equal(finest_only, fuse_clusters(result, 0.7, mode="merge")[1])


def fused_labels_reference(seen, clusters, num_seen, ratio):
    out = seen.clone()
    up = F.interpolate(clusters[:, None].float(), size=seen.shape[-2:], mode="nearest")[:, 0].long()
    for b in range(seen.shape[0]):
        new_id = 0
        for k in range(int(clusters.max()) + 1):
            pixels = up[b] == k
            ignored = pixels & (seen[b] == 255)
            if ignored.sum() == 0 or (pixels.sum() - ignored.sum()) / pixels.sum() > ratio:
                continue
            out[b][ignored] = num_seen + new_id
            new_id += 1
    return out


def test_fused_labels_matches_reference():
    seen = torch.randint(0, 3, (2, 16, 16))
    seen[torch.rand(2, 16, 16) < 0.5] = 255
    seen[0, :8] = 255  # a region without any seen label
    clusters = torch.randint(0, 6, (2, 4, 4))
    for ratio in (0.3, 0.5, 0.9):
        torch.testing.assert_close(
            fused_labels(seen, clusters, 3, ratio), fused_labels_reference(seen, clusters, 3, ratio)
        )


def test_fused_labels_by_hand():
    seen = torch.tensor([[[0, 0, 255, 255], [0, 0, 255, 255], [255, 1, 255, 255], [1, 1, 255, 255]]])
    clusters = torch.tensor([[[0, 1], [2, 1]]])  # upsampled x2: cluster 0 top-left, 1 right half, 2 bottom-left
    out = fused_labels(seen, clusters, num_seen=2, drop_seen_ratio=0.5)
    # cluster 0 has no ignore pixel (dropped); 1 is all ignore -> id 2 + 0; 2 is 3/4 seen -> dropped
    expected = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 2], [255, 1, 2, 2], [1, 1, 2, 2]]])
    assert torch.equal(out, expected)
