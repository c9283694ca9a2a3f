"""ZegCLIP's NEL (focal x100 + dice) against a plain per-image, per-class reference."""

import torch
import torch.nn.functional as F

from clipzss.method.nel import NonMutuallyExclusiveLoss


def nel_reference(logits, target, valid_channels):
    """ZegCLIP's SegLossPlus terms, one present (image, class) mask at a time, 255 pixels left out."""
    focal, dice, count = 0.0, 0.0, 0
    for b in range(logits.shape[0]):
        keep = target[b] != 255
        for c in range(logits.shape[1]):
            if not valid_channels[b, c] or not (target[b] == c).any():
                continue
            x, t = logits[b, c][keep], (target[b][keep] == c).float()
            p = x.sigmoid()
            ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            p_t = p * t + (1 - p) * (1 - t)
            focal = focal + ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean()
            dice = dice + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            count += 1
    return (100 * focal + dice) / count


def test_matches_reference_with_padded_channels():
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 7))
    target[torch.rand(2, 6, 7) < 0.3] = 255
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    loss = NonMutuallyExclusiveLoss()(logits, target, valid)
    expected = nel_reference(logits, target, valid)
    torch.testing.assert_close(loss, expected)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g1, g2)
    assert torch.all(g1[1, 3:] == 0)  # padded channels are never supervised


def test_no_present_class_gives_attached_zero():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = NonMutuallyExclusiveLoss()(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0 and loss.requires_grad


def test_confident_correct_logits_give_small_loss():
    target = torch.randint(0, 3, (1, 8, 8))
    good = 20 * (F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 2 - 1)
    nel = NonMutuallyExclusiveLoss()
    assert nel(good, target) < 0.01 < nel(-good, target)
