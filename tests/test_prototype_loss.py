"""The synthesizer's text loss: cosine, softmax and sigmoid bring seen prototypes onto their text; bce does not."""

import pytest
import torch
import torch.nn.functional as F

from clipzss.method.prototype_loss import PrototypeTextLoss
from clipzss.method.synthesizer import Synthesizer

C, NS = 16, 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: threads only add synchronisation (this fit is ~20x slower on a busy 2-core machine without)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def region_queries(text, n, noise=0.6):
    """n images, each with one region of every class: teacher-like centroids (a fixed linear distortion of the
    class text plus noise). Row k is class k, as the loss reads it."""
    mix = torch.randn(C, C, generator=torch.Generator().manual_seed(1)) / C**0.5  # far from the texts
    classes = torch.arange(NS).expand(n, NS)
    return F.normalize(text[classes] @ mix + noise * torch.randn(n, NS, C) / C**0.5, dim=-1), classes


def fit(kind, steps=100):
    text = F.normalize(torch.randn(NS, C), dim=-1)
    synth, loss_fn = Synthesizer(C, 1, 4, dense_memory=False), PrototypeTextLoss(kind)
    optimiser = torch.optim.Adam([*synth.parameters(), *loss_fn.parameters()], lr=3e-3)
    for _ in range(steps):
        queries, _ = region_queries(text, 8)
        present = torch.ones(8, NS, dtype=torch.bool)
        prototypes = synth(queries, present, F.normalize(torch.randn(8, C), dim=-1))
        loss = loss_fn(prototypes, present, text, torch.tensor(1 / 0.07))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    queries, classes = region_queries(text, 64)
    assert (queries @ text.T).argmax(-1).eq(classes).float().mean() < 0.3  # the queries alone miss their text
    with torch.no_grad():
        prototypes = synth(queries, torch.ones(64, NS, dtype=torch.bool), F.normalize(torch.randn(64, C), dim=-1))
    own = (prototypes * text[classes]).sum(-1)
    return (prototypes @ text.T).argmax(-1).eq(classes).float().mean().item(), own.mean().item()


@pytest.mark.parametrize("kind", ["cosine", "softmax", "sigmoid"])
def test_short_fit_puts_seen_prototypes_on_their_own_text(kind):
    top1, own_cos = fit(kind)
    assert top1 >= 0.9, (kind, top1)
    assert own_cos > 0.5, (kind, own_cos)


def test_old_bias_free_bce_stays_far_from_the_text():
    _, own_cos = fit("bce")
    assert own_cos < 0.4


def test_losses_by_hand_and_absent_prototypes_ignored():
    text = torch.eye(3, 4)
    prototypes = torch.stack([text, text.roll(1, 0)])[:, :, :]  # image 0 exact, image 1 wrong classes
    present = torch.tensor([[True, True, True], [False, False, False]])
    scale = torch.tensor(10.0)
    assert PrototypeTextLoss("cosine")(prototypes, present, text, scale) == 0
    expected = F.cross_entropy(10 * torch.eye(3), torch.arange(3))
    torch.testing.assert_close(PrototypeTextLoss("softmax")(prototypes, present, text, scale), expected)
    assert PrototypeTextLoss("sigmoid").bias.requires_grad
    with pytest.raises(ValueError, match="plm.synthesizer.loss"):
        PrototypeTextLoss("mse")
