"""Datasets in the converted layouts: inductive label mapping, val sizes, every layout, path handling."""

import numpy as np
import pytest
import torch
from dataset_fixtures import FIXTURE_LAYOUTS, write_dataset_fixture, write_voc_fixture
from PIL import Image
from torch.utils.data import DataLoader

from clipzss.config import DataConfig
from clipzss.data.datasets import DATASETS, SegmentationDataset, build_dataset
from clipzss.data.splits import load_split


def identity(image, label):
    return torch.from_numpy(np.asarray(image).copy()), torch.from_numpy(label.astype(np.int64))


def test_voc_train_maps_labels_to_seen_space_and_hides_unseen_names(tmp_path):
    root = write_voc_fixture(tmp_path, n_train=6)
    split = load_split("voc")
    data = SegmentationDataset(root, "voc", "train", split, identity)
    assert data.class_names == split.seen and data.unseen_ids == []
    assert not set(split.unseen) & set(data.class_names)
    for i, sample in enumerate(data.samples):
        raw = np.array(Image.open(sample.label))
        expected = np.full(raw.shape, 255)
        for full_id, name in enumerate(split.classes):  # raw id = full id + 1 (0 = background)
            if name in split.seen:
                expected[raw == full_id + 1] = split.seen.index(name)
        item = data[i]
        assert item["name"] == sample.name and torch.equal(item["label"], torch.from_numpy(expected))


def test_voc_val_keeps_full_space_and_label_size(tmp_path):
    root = write_voc_fixture(tmp_path, size=(40, 60))
    cfg = DataConfig(dataset="voc", root=str(root), test_short_side=20)
    data = build_dataset(cfg, "val")
    split = load_split("voc")
    assert data.class_names == split.classes and data.unseen_ids == split.unseen_ids
    item = data[0]
    raw = np.array(Image.open(data.samples[0].label)).astype(np.int64)  # palette PNG: indices
    expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
    assert item["image"].shape == (3, 20, 30) and item["image"].dtype == torch.float32
    assert torch.equal(item["label"], torch.from_numpy(expected))


def test_train_batches_collate_to_crops(tmp_path):
    root = write_voc_fixture(tmp_path)
    cfg = DataConfig(dataset="voc", root=str(root), crop_size=32, scale=(96, 40))
    batch = next(iter(DataLoader(build_dataset(cfg, "train"), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 32, 32)
    assert (
        batch["label"].dtype == torch.long and ((batch["label"] < 15) | (batch["label"] >= 255)).all()
    )  # 256: padding


@pytest.mark.parametrize("dataset", [d for d in DATASETS if d in FIXTURE_LAYOUTS])
def test_every_layout_loads(tmp_path, dataset):
    root = write_dataset_fixture(dataset, tmp_path, n_train=3, n_val=2)
    cfg = DataConfig(dataset=dataset, root=str(root), crop_size=16, scale=(96, 40), test_short_side=20)
    split = load_split(dataset, "all")
    train, val = build_dataset(cfg, "train", split="all"), build_dataset(cfg, "val", split="all")
    assert (len(train), len(val)) == (3, 2)
    assert train[0]["label"].shape == (16, 16)
    label = val[1]["label"]
    assert label.shape == (40, 48) and int(label[label != 255].max()) < len(split.classes)


def test_context59_and_context60_read_the_same_files_differently(tmp_path):
    root = write_dataset_fixture("context59", tmp_path)
    cfg = DataConfig(root=str(root), test_short_side=40)
    c59 = build_dataset(cfg, "val", dataset="context59", split="all")[0]["label"]
    c60 = build_dataset(cfg, "val", dataset="context60", split="all")[0]["label"]
    raw = c60.clone()
    assert torch.equal(c59, torch.where((raw == 0) | (raw == 255), 255, raw - 1))


def test_root_may_start_with_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_voc_fixture(tmp_path / "data")
    data = build_dataset(DataConfig(), "val", root="~/data/VOCdevkit/VOC2012")
    assert len(data) == 2


def test_unknown_dataset_lists_the_allowed(tmp_path):
    with pytest.raises(ValueError, match="allowed: voc, coco_stuff"):
        build_dataset(DataConfig(), "val", dataset="cityscapes", root=str(tmp_path))


def test_voc_train_merges_mmseg_train_and_aug_lists(tmp_path):
    """mmseg's converter writes the SBD extras to aug.txt and VOC's own train list to train.txt: both are used."""
    root = write_voc_fixture(tmp_path, n_train=4, n_val=2)
    lists = root / "ImageSets" / "Segmentation"
    names = (lists / "aug.txt").read_text().split()
    (lists / "aug.txt").write_text("\n".join(names[2:]) + "\n")
    (lists / "train.txt").write_text("\n".join(names[:3]) + "\n")  # one name in both lists
    dataset = build_dataset(DataConfig(root=str(root)), "train")
    assert sorted(s.name for s in dataset.samples) == sorted(names)
