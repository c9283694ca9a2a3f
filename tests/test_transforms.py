"""Paired augmentation: geometry against plain numpy references, padding, reproducibility, test-time resize."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipzss.config import DataConfig
from clipzss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_INDEX,
    TrainTransform,
    normalize,
    photometric_distortion,
    random_crop,
    rescale_size,
)
from clipzss.data.transforms import TestTransform as EvalTransform  # not a pytest class


def pair(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 5, size=(h, w), dtype=np.uint8)
    label[0] = 255
    return Image.fromarray(image), label


def test_rescale_size_follows_mmcv_keep_ratio():
    assert rescale_size(500, 375, 2048, 512) == (683, 512)  # short side limits
    assert rescale_size(3000, 500, 2048, 512) == (2048, 341)  # long side limits
    assert rescale_size(48, 40, 48, 40) == (48, 40)


def test_constants_are_imagenet_in_0_1_scale():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    pixel = np.array([[[124, 116, 104]]], dtype=np.uint8)
    expected = (np.array([124, 116, 104]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(normalize(pixel)[:, 0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_flip_and_pad_without_resize_match_a_plain_reference():
    image, label = pair()
    cfg = DataConfig(crop_size=64, scale=(48, 40), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False)
    out_image, out_label = TrainTransform(cfg)(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64) and out_label.dtype == torch.long
    assert torch.equal(out_label[:40, :48], torch.from_numpy(label[:, ::-1].astype(np.int64)))
    assert torch.equal(out_image[:, :40, :48], normalize(np.asarray(image)[:, ::-1]))
    assert (out_label[40:] == PAD_INDEX).all() and (out_label[:, 48:] == PAD_INDEX).all()
    assert (out_image[:, 40:] == 0).all() and (out_image[:, :, 48:] == 0).all()


def test_train_transform_crops_resized_pairs_with_nearest_labels():
    image, label = pair(60, 80)
    cfg = DataConfig(crop_size=32, scale=(160, 60), ratio_range=(0.5, 2.0))
    for seed in range(5):
        out_image, out_label = TrainTransform(cfg)(image, label, np.random.default_rng(seed))
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert set(out_label.unique().tolist()) <= set(np.unique(label).tolist())  # nearest: no new ids


def test_same_global_seed_same_augmentation():
    image, label = pair()
    transform = TrainTransform(DataConfig(crop_size=32, scale=(96, 40)))
    np.random.seed(3)
    first = transform(image, label)
    np.random.seed(3)
    again = transform(image, label)
    np.random.seed(4)
    other = transform(image, label)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_cat_max_ratio_prefers_crops_with_several_classes():
    label = np.zeros((100, 100), dtype=np.uint8)
    label[:25, :25] = 1
    label[60:, :] = 255  # ignore pixels do not count towards the ratio
    image = np.zeros((100, 100, 3), dtype=np.uint8)

    def mixed_fraction(ratio):
        hits = 0
        for seed in range(60):
            _, crop = random_crop(image, label, 30, ratio, np.random.default_rng(seed))
            values, counts = np.unique(crop[crop != 255], return_counts=True)
            hits += len(values) > 1 and counts.max() / counts.sum() < 0.75
        return hits / 60

    assert mixed_fraction(0.75) > mixed_fraction(1.0) + 0.3


def test_photometric_distortion_stays_in_range_and_changes_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    outs = [photometric_distortion(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)


def test_test_transform_resizes_image_only():
    image, label = pair(40, 60)
    out_image, out_label = EvalTransform(DataConfig(test_short_side=20))(image, label)
    assert out_image.shape == (3, 20, 30)
    assert torch.equal(out_label, torch.from_numpy(label.astype(np.int64)))


@pytest.mark.parametrize("size", [(20, 20), (33, 17)])
def test_small_images_are_padded_to_the_crop(size):
    image, label = pair(*size)
    cfg = DataConfig(crop_size=64, scale=(size[1], size[0]), ratio_range=(1.0, 1.0))
    out_image, out_label = TrainTransform(cfg)(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 64, 64) and (out_label[size[0] :] == PAD_INDEX).all()
    w, h = rescale_size(size[1], size[0], *cfg.scale)
    outside = (torch.arange(64)[:, None] >= h) | (torch.arange(64)[None, :] >= w)
    assert torch.equal(out_label == PAD_INDEX, outside)  # padding is exactly the area outside the image
    assert (out_label == 255).any()  # the image's unlabelled pixels stay 255
