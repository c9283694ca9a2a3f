"""The synthetic zero-shot world: determinism, labels, the split file, and the on-disk layout."""

import json

import numpy as np
import pytest
from PIL import Image

from clipzss.config import load_config
from clipzss.data import synthetic
from clipzss.data.datasets import build_dataset
from clipzss.data.splits import load_split
from clipzss.data.synthetic import (
    CLASS_ATTRIBUTES,
    CLASSES,
    COLOURS,
    IGNORE_INDEX,
    TEXTURES,
    materialize_world,
    render_object,
    render_scene,
    scene_rng,
)


def test_scenes_are_deterministic_and_streams_differ():
    a = render_scene(scene_rng(0, "train", 5))
    b = render_scene(scene_rng(0, "train", 5))
    c = render_scene(scene_rng(0, "val", 5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.classes == b.classes
    assert not np.array_equal(a.image, c.image)
    with pytest.raises(ValueError, match="unknown stream 'test'"):
        scene_rng(0, "test", 0)


def test_scene_labels_match_the_painted_objects():
    for i in range(50):
        scene = render_scene(scene_rng(1, "train", i), size=48)
        assert scene.image.shape == (48, 48, 3) and scene.image.dtype == np.uint8
        assert scene.label.shape == (48, 48) and scene.label.dtype == np.uint8
        assert 1 <= len(scene.classes) <= 4
        present = set(np.unique(scene.label).tolist()) - {IGNORE_INDEX}
        assert present == set(scene.classes)
        assert (scene.label == IGNORE_INDEX).any()  # background is ignored, like VOC's


def test_object_pixels_carry_their_colour():
    for cid, name in enumerate(CLASSES):
        scene = render_object(scene_rng(0, "clip_eval", cid), cid)
        assert scene.classes == [cid]
        pixels = scene.image[scene.label == cid].astype(float)  # [P, 3]
        bright = pixels[pixels.sum(1) >= np.percentile(pixels.sum(1), 75)].mean(0)  # the undarkened phase
        colour = np.array(COLOURS[CLASS_ATTRIBUTES[name][0]], float)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - bright).sum())
        assert nearest == CLASS_ATTRIBUTES[name][0], (name, bright, colour)


def test_textures_differ_in_dark_fraction():
    dark = {t: [] for t in TEXTURES}
    for i in range(64):
        cid = i % len(CLASSES)
        scene = render_object(scene_rng(2, "clip_eval", i), cid)
        pixels = scene.image[scene.label == cid].astype(float).sum(1)
        dark[CLASS_ATTRIBUTES[CLASSES[cid]][1]].append((pixels < 0.6 * np.percentile(pixels, 90)).mean())
    means = {t: float(np.mean(v)) for t, v in dark.items()}
    assert means["plain"] < 0.05
    assert means["dotted"] < means["striped"] and means["dotted"] < means["checkered"]
    assert 0.3 < means["striped"] < 0.7 and 0.3 < means["checkered"] < 0.7


def test_split_file_matches_the_generator():
    split = load_split("synthetic")
    assert split.classes == CLASSES
    assert load_split("synthetic", "all").unseen == ()
    assert split.unseen and set(split.unseen) < set(CLASSES)


def test_every_unseen_category_composes_seen_attributes():
    split = load_split("synthetic")
    seen_colours = {CLASS_ATTRIBUTES[c][0] for c in split.seen}
    seen_textures = {CLASS_ATTRIBUTES[c][1] for c in split.seen}
    for name in split.unseen:
        colour, texture = CLASS_ATTRIBUTES[name]
        assert colour in seen_colours and texture in seen_textures, name
        assert name not in split.seen


def test_offline_default_config_names_the_synthetic_world():
    cfg = load_config("synthetic")
    assert cfg.data.dataset == "synthetic" and cfg.data.crop_size == 64
    assert cfg.teacher.model == "@assets/synthetic_clip.json" and cfg.teacher.pretrained == "@assets/synthetic_clip.pt"
    assert cfg.teacher.templates == "single"
    assert all(8 % s == 0 for s in cfg.plm.kmeans.scales)  # windows tile the 8x8 token grid


def test_materialize_world_layout_and_idempotence(tmp_path, monkeypatch):
    root = materialize_world(tmp_path / "w", seed=3, n_train=6, n_val=2, size=32, progress=False)
    names = sorted(p.name for p in (root / "images" / "train").iterdir())
    assert names == [f"train_{i:06d}.png" for i in range(6)]
    assert len(list((root / "annotations" / "val").iterdir())) == 2
    image = Image.open(root / "images" / "val" / "val_000001.png")
    label = np.asarray(Image.open(root / "annotations" / "val" / "val_000001.png"))
    assert image.mode == "RGB" and image.size == (32, 32)
    expected = render_scene(scene_rng(3, "val", 1), 32)
    assert np.array_equal(np.asarray(image), expected.image) and np.array_equal(label, expected.label)
    assert json.loads((root / "world.json").read_text())["n_train"] == 6

    calls = []
    monkeypatch.setattr(synthetic, "render_scene", lambda *a, **k: calls.append(1) or expected)
    materialize_world(root, seed=3, n_train=6, n_val=2, size=32, progress=False)
    assert not calls  # same parameters: nothing regenerated
    materialize_world(root, seed=3, n_train=3, n_val=1, size=32, progress=False)
    assert len(calls) == 4  # different parameters: regenerated, stale files gone
    assert len(list((root / "images" / "train").iterdir())) == 3


def test_materialized_world_reads_through_the_dataset_loader(tmp_path):
    root = materialize_world(tmp_path / "w", seed=0, n_train=4, n_val=3, size=64, progress=False)
    cfg = load_config("synthetic", [f"data.root={root}"])
    split = load_split("synthetic")
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert len(train) == 4 and len(val) == 3 and train.class_names == split.seen
    sample = val[0]
    assert sample["image"].shape == (3, 64, 64)
    expected = render_scene(scene_rng(0, "val", 0), 64).label
    assert np.array_equal(sample["label"].numpy(), expected)
    for i in range(4):
        seen_label = train[i]["label"]
        labelled = seen_label[seen_label < IGNORE_INDEX]  # 255 = ignore, 256 = crop padding
        assert (labelled < len(split.seen)).all() and (seen_label <= 256).all()  # unseen pixels became 255
