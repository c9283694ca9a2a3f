"""Segmentation datasets in the mmsegmentation-converted layouts (what ZegCLIP users have on disk).

Train mode is inductive: labels are mapped to the seen index space 0..Ns-1 and unseen-class pixels become 255, and
only seen class names are exposed. Val mode keeps the full class index space. Every check that :mod:`validate`
reports is made here too, with the same message, and raises :class:`DatasetError` at the first problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipzss.config import DataConfig
from clipzss.data.images import ImageModeError, to_rgb
from clipzss.data.splits import ZeroShotSplit, load_split
from clipzss.data.transforms import IGNORE_INDEX, TestTransform, TrainTransform

Mode = Literal["train", "val"]


@dataclass(frozen=True)
class ModeLayout:
    """Where one mode's files are, relative to the dataset root; ``split_file=None`` = every image in img_dir."""

    img_dir: str
    ann_dir: str
    split_file: str | None
    also_list: str | None = None  # a second list merged in when present (mmseg's VOC: train.txt + aug.txt)


@dataclass(frozen=True)
class Layout:
    """One dataset's converted layout.

    Attributes:
        root_hint: the folder users point ``root`` at (shown in errors).
        reduce_zero_label: mmseg's rule: 0 -> 255, other ids shift by -1, 255 stays 255.
    """

    root_hint: str
    train: ModeLayout
    val: ModeLayout
    img_suffix: str
    seg_suffix: str
    reduce_zero_label: bool


_CONTEXT = dict(
    root_hint="VOCdevkit/VOC2010",
    train=ModeLayout("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt"),
    val=ModeLayout("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt"),
    img_suffix=".jpg",
    seg_suffix=".png",
)

LAYOUTS: dict[str, Layout] = {
    # train: VOC train + SBD aug minus VOC val (10,582 names; clipzss prepare writes it, VOC's own PNGs included).
    "voc": Layout(
        root_hint="VOCdevkit/VOC2012",
        train=ModeLayout(
            "JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation/aug.txt", "ImageSets/Segmentation/train.txt"
        ),
        val=ModeLayout("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt"),
        img_suffix=".jpg",
        seg_suffix=".png",
        reduce_zero_label=True,
    ),
    "coco_stuff": Layout(
        root_hint="coco_stuff164k",
        train=ModeLayout("images/train2017", "annotations/train2017", None),
        val=ModeLayout("images/val2017", "annotations/val2017", None),
        img_suffix=".jpg",
        seg_suffix="_labelTrainIds.png",
        reduce_zero_label=False,
    ),
    "context59": Layout(**_CONTEXT, reduce_zero_label=True),
    "context60": Layout(**_CONTEXT, reduce_zero_label=False),
    "ade20k": Layout(
        root_hint="ADEChallengeData2016",
        train=ModeLayout("images/training", "annotations/training", None),
        val=ModeLayout("images/validation", "annotations/validation", None),
        img_suffix=".jpg",
        seg_suffix=".png",
        reduce_zero_label=True,
    ),
    "synthetic": Layout(
        root_hint="<output of clipzss prepare synthetic>",
        train=ModeLayout("images/train", "annotations/train", None),
        val=ModeLayout("images/val", "annotations/val", None),
        img_suffix=".png",
        seg_suffix=".png",
        reduce_zero_label=False,
    ),
}
DATASETS: tuple[str, ...] = tuple(LAYOUTS)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset on disk: the file (or folder) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DatasetError(ValueError):
    """A dataset on disk is missing, incomplete or corrupt; the message names each file and its problem."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Sample:
    """One image/label pair on disk; ``name`` is the split-file entry (the file stem)."""

    name: str
    image: Path
    label: Path


def layout_of(dataset: str) -> Layout:
    """The layout of ``dataset``; raises ValueError listing the known datasets."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return LAYOUTS[dataset]


def check_root(dataset: str, root: str | Path) -> list[Problem]:
    """A problem if ``root`` is not a folder (naming the folder users point root at)."""
    path = Path(root).expanduser()
    if path.is_dir():
        return []
    hint = layout_of(dataset).root_hint
    return [Problem(str(path), f"dataset root not found (expected the {dataset} folder {hint})")]


def list_samples(dataset: str, root: str | Path, mode: Mode) -> tuple[list[Sample], list[Problem]]:
    """The samples of one mode, and a problem for every entry whose image or label file is missing.

    Raises:
        DatasetError: missing root, missing split file or image folder, or an empty split (nothing to list).
    """
    layout, base = layout_of(dataset), Path(root).expanduser()
    fatal = check_root(dataset, base)
    if fatal:
        raise DatasetError(fatal)
    where = getattr(layout, mode)
    img_dir, ann_dir = base / where.img_dir, base / where.ann_dir
    if where.split_file is not None:
        split_file = base / where.split_file
        if not split_file.is_file():
            raise DatasetError([Problem(str(split_file), f"{mode} split file not found")])
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        also = base / where.also_list if where.also_list else None
        if also is not None and also.is_file():  # union, first-seen order (either convention gives 10,582 on VOC)
            names = list(dict.fromkeys(names + [n.strip() for n in also.read_text().splitlines() if n.strip()]))
        source = split_file
    else:
        if not img_dir.is_dir():
            raise DatasetError([Problem(str(img_dir), f"{mode} image folder not found")])
        names = sorted(p.name[: -len(layout.img_suffix)] for p in img_dir.glob(f"*{layout.img_suffix}"))
        source = img_dir
    if not names:
        raise DatasetError([Problem(str(source), f"empty {mode} split: no samples listed")])
    samples, problems = [], []
    for name in names:
        sample = Sample(name, img_dir / f"{name}{layout.img_suffix}", ann_dir / f"{name}{layout.seg_suffix}")
        missing = [p for p in (sample.image, sample.label) if not p.is_file()]
        problems += [Problem(str(p), f"missing file (listed as {name!r} in {source})") for p in missing]
        if not missing:
            samples.append(sample)
    return samples, problems


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's rule on (H, W) uint8 ids: 0 -> 255, k -> k - 1, 255 stays 255."""
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_sample(
    sample: Sample, num_classes: int, reduce_zero: bool
) -> tuple[Image.Image | None, np.ndarray | None, list[Problem]]:
    """Load and check one pair: decodable image and label (Pillow open + load), single-channel label, label ids
    in [0, num_classes) or 255 after reduce_zero_label, equal sizes.

    Returns:
        (RGB image, (H, W) uint8 label in the full class space, problems); image/label are None if undecodable.
    """
    problems: list[Problem] = []
    image = label = None
    try:
        with Image.open(sample.image) as f:
            f.load()
            image = to_rgb(f, sample.image)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:  # Pillow raises these for corrupt/truncated files
        problems.append(Problem(str(sample.image), f"corrupt or truncated image ({e})"))
    except ImageModeError as e:
        problems.append(Problem(str(sample.image), e.reason))
    try:
        with Image.open(sample.label) as f:
            f.load()
            if f.mode not in ("L", "P"):
                problems.append(Problem(str(sample.label), f"label is not a single-channel PNG (mode {f.mode})"))
            else:
                label = np.array(f, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        problems.append(Problem(str(sample.label), f"corrupt or truncated label ({e})"))
    if label is not None:
        top = num_classes if reduce_zero else num_classes - 1  # largest valid id in the file on disk
        bad = np.unique(label[(label > top) & (label != IGNORE_INDEX)])
        if bad.size:
            values = ", ".join(str(v) for v in bad[:10])
            rule = " (0 = background, reduce_zero_label)" if reduce_zero else ""
            problems.append(
                Problem(str(sample.label), f"label value(s) {values} outside the classes (0..{top} or 255{rule})")
            )
        elif reduce_zero:
            label = reduce_zero_label(label)
    if image is not None and label is not None and image.size != (label.shape[1], label.shape[0]):
        problems.append(
            Problem(
                str(sample.label),
                f"size mismatch: label is {label.shape[1]}x{label.shape[0]}, image {sample.image} is "
                f"{image.size[0]}x{image.size[1]} (WxH)",
            )
        )
    return image, label, problems


class SegmentationDataset(torch.utils.data.Dataset):
    """One mode of a dataset, with labels in the seen (train) or full (val) class space.

    Attributes:
        class_names: train: the seen names only (unseen names are never exposed); val: every class.
        unseen_ids: val: ids of the unseen classes in class_names; train: [].
        samples: the listed image/label pairs.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        mode: Mode,
        split: ZeroShotSplit,
        transform: Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    ):
        if mode not in ("train", "val"):
            raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
        self.dataset, self.mode, self.split, self.transform = dataset, mode, split, transform
        self.layout = layout_of(dataset)
        self.samples, problems = list_samples(dataset, root, mode)
        if problems:
            raise DatasetError(problems)
        if mode == "train":
            self.class_names, self.unseen_ids = split.seen, []
            lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # full class id -> seen id; unseen and 255 -> 255
            lut[split.seen_ids] = np.arange(len(split.seen_ids), dtype=np.uint8)
            self.lut: np.ndarray | None = lut
        else:
            self.class_names, self.unseen_ids, self.lut = split.classes, split.unseen_ids, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """``{"image": FloatTensor[3, H, W] ImageNet-normalised, "label": LongTensor[H, W], "name": str}``."""
        sample = self.samples[index]
        image, label, problems = read_sample(sample, len(self.split.classes), self.layout.reduce_zero_label)
        if problems:
            raise DatasetError(problems)
        if self.lut is not None:
            label = self.lut[label]
        image_t, label_t = self.transform(image, label)
        return {"image": image_t, "label": label_t, "name": sample.name}


def build_dataset(
    cfg: DataConfig, mode: Mode, dataset: str | None = None, root: str | None = None, split: str | None = None
) -> SegmentationDataset:
    """The train or val dataset of ``cfg`` (or of ``dataset``/``root``/``split``, e.g. a cross-dataset target).

    Train mode uses :class:`TrainTransform`, val mode :class:`TestTransform`.
    """
    name = dataset or cfg.dataset
    layout_of(name)
    zero_shot = load_split(name, split or cfg.split)
    transform = TrainTransform(cfg) if mode == "train" else TestTransform(cfg)
    return SegmentationDataset(Path(root or cfg.root).expanduser(), name, mode, zero_shot, transform)
