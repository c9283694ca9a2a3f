"""GLM diagnostics: the measures against plain references."""

import math

import torch
import torch.nn.functional as F

from clipzss.engine.glm_diagnostics import linear_cka, pixel_text_cos, present_classes, top1_present


def test_linear_cka_is_one_up_to_rotation_and_scale_and_low_for_unrelated_features():
    torch.manual_seed(0)
    X = torch.randn(500, 6)
    Q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert math.isclose(linear_cka(X, 3 * X @ Q + 1), 1.0, rel_tol=1e-9)
    assert linear_cka(X, torch.randn(500, 6)) < 0.05
    mixed = linear_cka(X, X + torch.randn(500, 6))
    assert 0.3 < mixed < 0.9


def test_present_classes_and_top1_match_a_loop():
    labels = torch.full((2, 20, 20), 255)
    labels[0, :10] = 1  # 200 pixels
    labels[0, 10, :3] = 2  # 3 pixels: under 1% of the image
    labels[1] = 0
    present = present_classes(labels, 3)
    assert present.tolist() == [[False, True, False], [True, False, False]]
    text = torch.eye(3)
    vectors = torch.tensor([[0.1, 2.0, 0.0], [0.0, 0.0, 1.0]])  # image 0: class 1 (present); image 1: class 2 (absent)
    assert top1_present(vectors, text, present) == 0.5


def test_pixel_text_cos_is_the_mean_over_the_chosen_classes_pixels():
    torch.manual_seed(0)
    R = F.normalize(torch.randn(1, 4, 2, 2), dim=1)
    text = F.normalize(torch.randn(3, 4), dim=-1)
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]])  # 2x2 blocks
    expected = ((R[0, :, 0, 0] @ text[0]) + (R[0, :, 1, 0] @ text[2])) / 2
    got = pixel_text_cos(R, labels, text, torch.tensor([0, 2]))
    assert math.isclose(got, float(expected), rel_tol=1e-6)
