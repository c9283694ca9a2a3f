"""Paired image/label augmentation: mmsegmentation's (and ZegCLIP's) train and test pipelines in numpy/PIL.

Train: RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad.
Test: keep-ratio resize of the image only (the label keeps its size; the predictor resizes logits to it).
Randomness comes from a ``numpy.random.Generator``; when none is passed, one is seeded from numpy's global RNG,
which the training loader seeds per sample, so augmentation is reproducible whatever worker runs it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clipzss.config import DataConfig

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB, 0-1 scale (mmseg: 123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # RGB, 0-1 scale (mmseg: 58.395, 57.12, 57.375)
IGNORE_INDEX = 255
PAD_INDEX = 256  # training label of crop padding: ignored like 255, but never a potential class (outside uint8 ids)

# mmseg PhotoMetricDistortion defaults; hue_delta is on OpenCV's 0-180 hue scale.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
CROP_TRIES = 10  # mmseg RandomCrop: re-draws allowed when one class covers more than cat_max_ratio


def rescale_size(width: int, height: int, long_max: int, short_max: int) -> tuple[int, int]:
    """mmcv ``imrescale`` keep-ratio target: the largest size with long side <= long_max and short side <= short_max.

    Returns:
        (new_width, new_height), rounded like mmcv (``int(x * factor + 0.5)``).
    """
    factor = min(long_max / max(width, height), short_max / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def random_resize(
    image: Image.Image,
    label: np.ndarray,
    scale: tuple[int, int],
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[Image.Image, np.ndarray]:
    """mmseg ``Resize(img_scale=scale, ratio_range=...)``: scale jittered by one ratio, keep-ratio rescale.

    Args:
        label: (H, W) uint8 class ids; resampled nearest.
    """
    ratio = rng.uniform(*ratio_range)
    size = rescale_size(*image.size, int(scale[0] * ratio), int(scale[1] * ratio))
    resized = Image.fromarray(label).resize(size, Image.NEAREST)
    return image.resize(size, Image.BILINEAR), np.asarray(resized)


def random_crop(
    image: np.ndarray, label: np.ndarray, crop_size: int, cat_max_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a crop_size window (smaller if the image is), re-drawn up to 10 times while one
    class covers >= cat_max_ratio of the crop's labelled pixels (255 not counted) or only one class is present.

    Args:
        image: (H, W, 3); label: (H, W).
    """

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(image.shape[0] - crop_size, 0) + 1)), int(
            rng.integers(0, max(image.shape[1] - crop_size, 0) + 1)
        )

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            window = label[top : top + crop_size, left : left + crop_size]
            values, counts = np.unique(window, return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return image[top : top + crop_size, left : left + crop_size], label[top : top + crop_size, left : left + crop_size]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: each step applied with probability 1/2, contrast before or after the
    colour steps (also 1/2).

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    out = image.astype(np.float32)
    if rng.integers(2):
        out = np.clip(out + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        out = np.clip(out * rng.uniform(*CONTRAST_RANGE), 0, 255)
    if rng.integers(2):
        hsv = np.asarray(Image.fromarray(out.astype(np.uint8)).convert("HSV")).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*SATURATION_RANGE), 0, 255)
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if rng.integers(2):
        shift = int(rng.integers(-HUE_DELTA, HUE_DELTA)) * 256 / 180  # OpenCV hue units -> PIL's 0-255 circle
        hsv = np.asarray(Image.fromarray(out.astype(np.uint8)).convert("HSV")).astype(np.float32)
        hsv[..., 0] = np.mod(np.round(hsv[..., 0] + shift), 256)
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.integers(2):
        out = np.clip(out * rng.uniform(*CONTRAST_RANGE), 0, 255)
    return out.astype(np.uint8)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> FloatTensor [3, H, W] normalised with IMAGENET_MEAN / IMAGENET_STD."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255
    std = np.asarray(IMAGENET_STD, dtype=np.float32) * 255
    return torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


class TrainTransform:
    """The training pipeline; ``transform(image, label) -> (FloatTensor[3, S, S], LongTensor[S, S])``, S = crop_size.

    Padding (bottom/right) is 0 in the normalised image, like mmseg's ``Pad``, and ``PAD_INDEX`` in the label
    (mmseg writes 255): the loss ignores both, but only unlabelled image pixels may become potential classes.
    """

    def __init__(self, cfg: DataConfig):
        self.crop_size = cfg.crop_size
        self.scale = cfg.scale
        self.ratio_range = cfg.ratio_range
        self.cat_max_ratio = cfg.cat_max_ratio
        self.flip_prob = cfg.flip_prob
        self.photometric = cfg.photometric

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one pair.

        Args:
            image: RGB PIL image of size (W, H).
            label: (H, W) uint8 class ids, 255 = ignore.
            rng: source of randomness; default: seeded from numpy's global RNG.
        """
        if rng is None:
            rng = np.random.default_rng(np.random.randint(2**31))
        image, label = random_resize(image, label, self.scale, self.ratio_range, rng)
        pixels, label = random_crop(np.asarray(image), label, self.crop_size, self.cat_max_ratio, rng)
        if rng.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)
        out_image = torch.zeros(3, self.crop_size, self.crop_size)
        out_label = torch.full((self.crop_size, self.crop_size), PAD_INDEX, dtype=torch.long)
        h, w = label.shape
        out_image[:, :h, :w] = normalize(pixels)
        out_label[:h, :w] = torch.from_numpy(label.astype(np.int64))
        return out_image, out_label


class TestTransform:
    """The test pipeline: keep-ratio resize so the short side is ``test_short_side`` (long side at most
    ``scale[0]``, mmseg's test img_scale), normalise; the label is returned at its original size.
    """

    def __init__(self, cfg: DataConfig):
        self.short_side = cfg.test_short_side
        self.long_max = cfg.scale[0]

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(RGB PIL image (W, H), (H, W) label) -> (FloatTensor[3, H', W'], LongTensor[H, W])."""
        size = rescale_size(*image.size, self.long_max, self.short_side)
        return normalize(np.asarray(image.resize(size, Image.BILINEAR))), torch.from_numpy(label.astype(np.int64))
