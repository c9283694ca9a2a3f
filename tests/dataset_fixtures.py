"""Tiny datasets written in the official (mmsegmentation-converted) layouts, for tests.

Paths are spelled out here independently of ``clipzss.data.datasets.LAYOUTS``, so the tests check the layouts
rather than repeat them. Labels are stored raw, as on disk (VOC/Context59/ADE: 0 = background, ids start at 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# dataset -> (root below the given folder, [(mode, img_dir, ann_dir, split_file or None)], img/seg suffixes,
#             largest raw label id)
FIXTURE_LAYOUTS: dict[str, tuple[str, list[tuple[str, str, str, str | None]], str, str, int]] = {
    "voc": (
        "VOCdevkit/VOC2012",
        [
            ("train", "JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation/aug.txt"),
            ("val", "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt"),
        ],
        ".jpg",
        ".png",
        20,
    ),
    "coco_stuff": (
        "coco_stuff164k",
        [
            ("train", "images/train2017", "annotations/train2017", None),
            ("val", "images/val2017", "annotations/val2017", None),
        ],
        ".jpg",
        "_labelTrainIds.png",
        170,
    ),
    "context59": (
        "VOCdevkit/VOC2010",
        [
            ("train", "JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt"),
            ("val", "JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt"),
        ],
        ".jpg",
        ".png",
        59,
    ),
    "ade20k": (
        "ADEChallengeData2016",
        [
            ("train", "images/training", "annotations/training", None),
            ("val", "images/validation", "annotations/validation", None),
        ],
        ".jpg",
        ".png",
        150,
    ),
    "synthetic": (
        "synthetic",
        [("train", "images/train", "annotations/train", None), ("val", "images/val", "annotations/val", None)],
        ".png",
        ".png",
        25,
    ),
}
FIXTURE_LAYOUTS["context60"] = FIXTURE_LAYOUTS["context59"]


def raw_label(rng: np.random.Generator, size: tuple[int, int], top: int) -> np.ndarray:
    """(H, W) uint8: four quadrants of random ids in 0..top and a 255 (ignore) border, like VOC's outlines."""
    h, w = size
    label = np.empty((h, w), dtype=np.uint8)
    ids = rng.integers(0, top + 1, size=4)
    label[: h // 2, : w // 2], label[: h // 2, w // 2 :] = ids[0], ids[1]
    label[h // 2 :, : w // 2], label[h // 2 :, w // 2 :] = ids[2], ids[3]
    label[0, :] = label[:, 0] = 255
    return label


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """A random RGB image of (H, W) ``size`` (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


def write_dataset_fixture(
    dataset: str, root: str | Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (40, 48), seed: int = 0
) -> Path:
    """Write ``n_train``/``n_val`` image-label pairs of (H, W) ``size`` in ``dataset``'s layout under ``root``.

    Returns:
        The dataset root to pass as ``data.root`` (e.g. ``root/VOCdevkit/VOC2012``).
    """
    base_rel, modes, img_suffix, seg_suffix, top = FIXTURE_LAYOUTS[dataset]
    base = Path(root) / base_rel
    rng = np.random.default_rng(seed)
    for mode, img_dir, ann_dir, split_file in modes:
        count = n_train if mode == "train" else n_val
        names = [f"{mode}_{i:04d}" for i in range(count)]
        for name in names:
            write_image(base / img_dir / f"{name}{img_suffix}", rng, size)
            label = Image.fromarray(raw_label(rng, size, top))
            if dataset == "voc" and mode == "val":  # VOC's own SegmentationClass PNGs are palette images
                label = label.convert("P")
            (base / ann_dir).mkdir(parents=True, exist_ok=True)
            label.save(base / ann_dir / f"{name}{seg_suffix}")
        if split_file is not None:
            (base / split_file).parent.mkdir(parents=True, exist_ok=True)
            (base / split_file).write_text("".join(f"{n}\n" for n in names))
    return base


def write_voc_fixture(root: str | Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (40, 48)) -> Path:
    """A tiny PASCAL VOC 2012 (aug) dataset under ``root``; returns ``root/VOCdevkit/VOC2012`` (= ``data.root``)."""
    return write_dataset_fixture("voc", root, n_train, n_val, size)
