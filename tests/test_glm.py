"""GLM: attention pooling and the gathered InfoNCE with a FIFO bank."""

import copy
import math

import torch
import torch.nn.functional as F

from clipzss.method.glm import GlobalLoss, attention_pool


def test_attention_pool_matches_loop():
    S, R = torch.randn(3, 8), torch.randn(3, 8, 4, 5)
    out = attention_pool(S, R)
    for b in range(3):
        tokens = R[b].flatten(1).T  # [L, C]
        weights = torch.softmax(tokens @ S[b] / math.sqrt(8), dim=0)
        torch.testing.assert_close(out[b], (weights[:, None] * tokens).sum(0))


def infonce_reference(S_hat, S, bank, tau):
    """The InfoNCE of docs/pages/method.md (GLM), one image at a time."""
    terms = []
    for i in range(S_hat.shape[0]):
        s_hat = F.normalize(S_hat[i], dim=0)
        pos = torch.exp(S[i] @ s_hat / tau)
        neg = sum(torch.exp(S[j] @ s_hat / tau) for j in range(S.shape[0]) if j != i)
        neg = neg + sum(torch.exp(v @ s_hat / tau) for v in bank)
        terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


def filled_loss(bank_size=6, filled=3, C=8):
    loss = GlobalLoss(C, tau=0.5, bank_size=bank_size)
    loss._enqueue(F.normalize(torch.randn(filled, C), dim=-1))
    return loss


def test_matches_reference_with_partly_filled_bank():
    loss = filled_loss()
    S, S_hat = F.normalize(torch.randn(4, 8), dim=-1), torch.randn(4, 8, dtype=torch.float32)
    expected = infonce_reference(S_hat, S, loss.bank[:3], tau=0.5)
    torch.testing.assert_close(loss(S_hat, S, S, 0), expected)


def test_two_process_split_equals_single_process():
    S = F.normalize(torch.randn(6, 8), dim=-1)
    S_hat = torch.randn(6, 8, requires_grad=True)
    single = filled_loss()
    ranks = [copy.deepcopy(single), copy.deepcopy(single)]
    full = single(S_hat, S, S, 0)
    (full_grad,) = torch.autograd.grad(full, S_hat)
    # each process sees its 3 rows and the gathered S; DDP averages the gradients of the two processes
    split = [ranks[r](S_hat[3 * r : 3 * r + 3], S[3 * r : 3 * r + 3], S, 3 * r) for r in range(2)]
    mean = (split[0] + split[1]) / 2
    (split_grad,) = torch.autograd.grad(mean, S_hat)
    torch.testing.assert_close(mean, full)
    torch.testing.assert_close(split_grad, full_grad)
    for r in range(2):  # every process pushed the same gathered batch
        torch.testing.assert_close(ranks[r].bank, single.bank)


def test_bank_is_fifo_and_only_fills_in_training():
    loss = GlobalLoss(4, tau=0.1, bank_size=5)
    a, b = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    loss(torch.randn(3, 4), a, a, 0)
    assert int(loss.bank_filled) == 3 and int(loss.bank_ptr) == 3
    loss(torch.randn(3, 4), b, b, 0)
    assert int(loss.bank_filled) == 5 and int(loss.bank_ptr) == 1
    torch.testing.assert_close(loss.bank, torch.stack([b[2], a[1], a[2], b[0], b[1]]))  # oldest row a[0] left
    loss.eval()
    before = loss.bank.clone()
    loss(torch.randn(3, 4), a, a, 0)
    assert torch.equal(loss.bank, before)


def test_bank_larger_batch_keeps_latest_and_backward_works():
    loss = GlobalLoss(4, tau=0.1, bank_size=2)
    S = F.normalize(torch.randn(5, 4), dim=-1)
    S_hat = torch.randn(5, 4, requires_grad=True)
    loss(S_hat, S, S, 0)
    out = loss(S_hat, S, S, 0)
    out.backward()  # the bank was updated in place after being used: autograd must not see that
    expected = infonce_reference(S_hat, S, S[-2:], tau=0.1)  # the bank held the first call's latest 2 rows
    (grad,) = torch.autograd.grad(expected, S_hat)
    torch.testing.assert_close(S_hat.grad, grad)
    torch.testing.assert_close(loss.bank, S[-2:])  # only the latest bank_size rows are kept


def test_attention_temperature_localises_where_sqrt_c_is_uniform():
    """On unit vectors softmax(S.R / sqrt(C)) is near uniform (S_hat = mean of R); attn_tau = 0.07 is not."""
    C = 64
    R = F.normalize(torch.randn(2, C, 4, 4), dim=1)
    S = R[:, :, 1, 2].clone()  # the CLS matches one token
    tokens = R.flatten(2)

    def entropy(tau):
        weights = torch.softmax(torch.einsum("bc,bcl->bl", S, tokens) / tau, dim=-1)
        return (-(weights * weights.log()).sum(-1) / math.log(16)).min().item()

    assert entropy(math.sqrt(C)) > 0.99
    assert entropy(0.07) < 0.5
    torch.testing.assert_close(attention_pool(S, R), attention_pool(S, R, tau=math.sqrt(C)))  # 0 = sqrt(C)
    sharp = F.normalize(attention_pool(S, R, tau=0.07), dim=-1)
    assert (sharp * S).sum(-1).min() > 0.9  # the pooled vector is the matching token, not the mean
    assert (F.normalize(attention_pool(S, R), dim=-1) * S).sum(-1).max() < 0.6


def objective_and_batch(*overrides, grid=4, C=8, Ns=3):
    """A CLIPZSSObjective on random inputs whose teacher tokens form a grid x grid map."""
    from clipzss.config import load_config
    from clipzss.method.objective import CLIPZSSObjective
    from clipzss.models.teacher import TeacherOutput

    cfg = load_config(None, ["glm.bank_size=4", "plm.synthesizer.heads=2", *overrides])
    torch.manual_seed(0)
    objective = CLIPZSSObjective(cfg, F.normalize(torch.randn(Ns, C), dim=-1))
    R = F.normalize(torch.randn(2, C, 8, 8), dim=1).requires_grad_(True)
    teacher = TeacherOutput(
        cls=F.normalize(torch.randn(2, C), dim=-1), dense=F.normalize(torch.randn(2, C, grid, grid), dim=1)
    )
    labels = torch.randint(0, Ns, (2, 16, 16))
    labels[:, :, 8:] = 255
    return objective, R, teacher, labels


def test_kmeans_scale_above_the_token_grid_is_refused_naming_the_grid():
    import pytest

    from clipzss.method.objective import KMeansScaleError

    objective, R, teacher, labels = objective_and_batch("plm.kmeans.scales=[2, 16]", grid=8)
    with pytest.raises(KMeansScaleError, match=r"\[16\].*8x8"):
        objective(R, teacher, labels)


def test_kmeans_scale_equal_to_the_grid_warns_once_and_finer_scales_are_silent():
    import warnings

    import pytest

    objective, R, teacher, labels = objective_and_batch("plm.kmeans.scales=[2, 4]", grid=4)
    with pytest.warns(UserWarning, match=r"\[4\].*4x4.*image mean"):
        objective(R, teacher, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective(R, teacher, labels)  # the same grid is checked once
        fine, R, teacher, labels = objective_and_batch("plm.kmeans.scales=[2, 4]", grid=8)
        fine(R, teacher, labels)


def test_glm_projection_starts_as_the_identity_and_matches_a_plain_reference():
    from clipzss.method.glm import glm_projection

    plain, R, teacher, labels = objective_and_batch("plm.enabled=false")
    projected, *_ = objective_and_batch("plm.enabled=false", "glm.projection=linear")
    torch.testing.assert_close(projected(R, teacher, labels)[0]["glm"], plain(R, teacher, labels)[0]["glm"])

    # with any W, b: InfoNCE of W S_hat + b, S_hat = mean of R (attn_tau 0 is sqrt(C): near uniform, computed exactly)
    torch.manual_seed(1)
    proj = glm_projection(8)
    with torch.no_grad():
        proj.weight.add_(0.3 * torch.randn(8, 8))
        proj.bias.add_(0.5 * torch.randn(8))
    projected.glm_proj.load_state_dict(proj.state_dict())
    projected.glm.bank.zero_(), projected.glm.bank_filled.zero_(), projected.glm.bank_ptr.zero_()
    loss = projected(R, teacher, labels)[0]["glm"]
    tokens = R.flatten(2)  # [B, C, L]
    weights = torch.softmax(torch.einsum("bc,bcl->bl", teacher.cls, tokens) / math.sqrt(8), dim=-1)
    S_hat = torch.einsum("bl,bcl->bc", weights, tokens) @ proj.weight.T + proj.bias
    expected = infonce_reference(S_hat, teacher.cls, [], tau=0.07)
    torch.testing.assert_close(loss, expected)
    proj.weight.requires_grad_(True)
    got = torch.autograd.grad(loss, [R, projected.glm_proj.weight])
    want = torch.autograd.grad(expected, [R, proj.weight])
    for g, e in zip(got, want, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e)


def test_glm_projection_is_built_only_with_the_glm():
    with_glm, *_ = objective_and_batch("glm.projection=linear")
    without, *_ = objective_and_batch("glm.projection=linear", "glm.weight=0")
    assert hasattr(with_glm, "glm_proj") and not hasattr(without, "glm_proj")
    assert not hasattr(objective_and_batch()[0], "glm_proj")
