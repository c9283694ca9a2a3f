"""PLM diagnostics: pseudo-label coverage / purity and pseudo-weight ranks against full labels, by hand."""

import torch

from clipzss.engine.plm_diagnostics import pseudo_label_counts


def test_counts_by_hand():
    truth = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 255, 255], [3, 3, 1, 1]])  # classes 2, 3 unseen
    fused = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 3, 3], [255, 255, 1, 1]])  # Ns = 2: potential 2, 3
    unseen = torch.tensor([False, False, True, True])
    text = torch.eye(4)
    pseudo = torch.stack([text[2], text[1]])  # potential 0 names class 2 (rank 1); potential 1 misses class 3
    counts = pseudo_label_counts(fused, truth, 2, unseen, pseudo, text)
    assert counts["covered"] / counts["unseen"] == 6 / 8  # two class-3 pixels got no potential class
    assert counts["majority"] / counts["with_truth"] == 1.0  # both potential classes are pure where truth exists
    assert 1 - counts["with_truth"] / counts["potential"] == 2 / 8  # the 255 pixels of potential 1
    assert counts["classes"] == 2 and counts["named"] == 2
    assert counts["rank_sum"] / counts["named"] == 1.5 and counts["top1"] == 1


def test_impure_cluster_and_no_potential():
    truth = torch.tensor([[2, 2, 3, 0]])
    fused = torch.tensor([[1, 1, 1, 0]])  # Ns = 1: one potential class over two unseen classes
    counts = pseudo_label_counts(
        fused, truth, 1, torch.tensor([False, False, True, True]), torch.eye(4)[:1], torch.eye(4)
    )
    assert counts["majority"] / counts["with_truth"] == 2 / 3
    none = pseudo_label_counts(torch.tensor([[0, 255, 255, 0]]), truth, 1, torch.tensor([False, False, True, True]),
                               torch.zeros(0, 4), torch.eye(4))  # fmt: skip
    assert none["covered"] == 0 and none["classes"] == 0 and none["unseen"] == 3
