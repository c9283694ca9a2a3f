"""Synthesizer: prototypes from region centroids attending to the teacher CLS (and dense tokens)."""

import pytest
import torch
import torch.nn.functional as F

from clipzss.method.synthesizer import Synthesizer


def inputs(B=2, Q=5, C=16):
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])[:B, :Q]
    return F.normalize(torch.randn(B, Q, C), dim=-1), valid, F.normalize(torch.randn(B, C), dim=-1)


def test_output_normalised_and_padding_ignored():
    synth = Synthesizer(16, layers=2, heads=4, dense_memory=False)
    queries, valid, cls = inputs()
    out = synth(queries, valid, cls)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 5))
    changed = queries.clone()
    changed[0, 3:] = torch.randn(2, 16)  # padding queries of image 0
    torch.testing.assert_close(synth(changed, valid, cls)[0, :3], out[0, :3])


def test_memory_is_cls_and_optionally_dense():
    queries, valid, cls = inputs()
    dense = F.normalize(torch.randn(2, 16, 3, 3), dim=1)
    plain = Synthesizer(16, 1, 4, dense_memory=False)
    assert not torch.allclose(plain(queries, valid, cls), plain(queries, valid, -cls))
    torch.testing.assert_close(plain(queries, valid, cls, dense), plain(queries, valid, cls, -dense))
    with_dense = Synthesizer(16, 1, 4, dense_memory=True)
    assert not torch.allclose(with_dense(queries, valid, cls, dense), with_dense(queries, valid, cls, -dense))
    with pytest.raises(ValueError, match="dense_memory"):
        with_dense(queries, valid, cls)


def test_image_without_queries_stays_finite_and_gradients_flow():
    synth = Synthesizer(16, 1, 4, dense_memory=False)
    queries, valid, cls = inputs()
    valid[0] = False
    queries.requires_grad_(True)
    out = synth(queries, valid, cls)
    assert torch.isfinite(out).all()
    params = [p for p in synth.parameters() if p.requires_grad]
    batched = torch.autograd.grad(out[1].sum(), [queries, *params])
    alone = queries[1:].detach().requires_grad_(True)  # the reference: image 1 on its own
    single = torch.autograd.grad(synth(alone, valid[1:], cls[1:]).sum(), [alone, *params])
    assert not batched[0][0].any()  # nothing of image 0 reaches image 1's output
    torch.testing.assert_close(batched[0][1:], single[0])
    for got, want in zip(batched[1:], single[1:], strict=True):
        torch.testing.assert_close(got, want)
    assert sum(float(g.abs().sum()) for g in single[1:]) > 0


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="plm.synthesizer.heads"):
        Synthesizer(10, 1, 4, dense_memory=False)


def test_region_mask_limits_each_query_to_its_region():
    queries, valid, cls = inputs()
    dense = F.normalize(torch.randn(2, 16, 3, 3), dim=1)
    mask = torch.zeros(2, 5, 9, dtype=torch.bool)
    mask[:, :, :4] = True  # every query sees tokens 0-3 only
    synth = Synthesizer(16, 1, 4, dense_memory=True)
    out = synth(queries, valid, cls, dense, mask)
    changed = dense.clone().flatten(2)
    changed[:, :, 4:] = torch.randn(2, 16, 5)
    torch.testing.assert_close(synth(queries, valid, cls, changed.view(2, 16, 3, 3), mask), out)
    assert not torch.allclose(synth(queries, valid, cls, changed.view(2, 16, 3, 3)), synth(queries, valid, cls, dense))
