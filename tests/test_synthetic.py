"""The synthetic zero-shot world: determinism, labels, the split file, and the on-disk layout."""

import fcntl
import json
import multiprocessing
import os
import time

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
    OBJECTS,
    SPLITS,
    STUFF,
    STUFF_IDS,
    TEXTURES,
    WORLD_VERSION,
    ignored_pixel_shares,
    materialize_world,
    render_object,
    render_scene,
    scene_rng,
)
from clipzss.data.transforms import PAD_INDEX


def test_scenes_are_deterministic_and_streams_differ():
    a = render_scene(scene_rng(0, "train", 5))
    b = render_scene(scene_rng(0, "train", 5))
    c = render_scene(scene_rng(0, "val", 5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.classes == b.classes
    assert not np.array_equal(a.image, c.image)
    with pytest.raises(ValueError, match="unknown stream 'test'"):
        scene_rng(0, "test", 0)


def test_every_pixel_is_labelled_except_thin_object_outlines():
    for i in range(50):
        scene = render_scene(scene_rng(1, "train", i), size=48)
        assert scene.image.shape == (48, 48, 3) and scene.image.dtype == np.uint8
        assert scene.label.shape == (48, 48) and scene.label.dtype == np.uint8
        present = set(np.unique(scene.label).tolist()) - {IGNORE_INDEX}
        assert set(scene.classes) <= present <= set(range(len(CLASSES)))
        assert present & set(STUFF_IDS)  # the background is nameable stuff, not an ignored void
        ignored = scene.label == IGNORE_INDEX
        assert ignored.mean() < 0.15
        # ignored pixels are thin outlines: within 2 px (where two outlines meet) of a labelled pixel
        assert _grow(_grow(~ignored))[ignored].all()


def _grow(mask):
    """Dilate a (H, W) bool mask by one pixel (4-neighbourhood)."""
    pad = np.pad(mask, 1)
    return mask | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]


def test_objects_come_first_then_stuff():
    assert CLASSES[: len(OBJECTS)] == OBJECTS and len(OBJECTS) == len(COLOURS) * len(TEXTURES)
    assert [CLASSES[i] for i in STUFF_IDS] == list(STUFF)
    with pytest.raises(ValueError, match="stuff class id 0"):
        render_scene(scene_rng(0, "train", 0), stuff=[0])
    with pytest.raises(ValueError, match="object class id 20"):
        render_scene(scene_rng(0, "train", 0), classes=[STUFF_IDS[0]])


def test_object_pixels_carry_their_colour():
    for cid, name in enumerate(OBJECTS):
        scene = render_object(scene_rng(0, "clip_eval", cid), cid)
        assert scene.classes[0] == cid and set(scene.classes[1:]) <= set(STUFF_IDS)
        pixels = scene.image[scene.label == cid].astype(float)  # [P, 3]
        bright = pixels[pixels.sum(1) >= np.percentile(pixels.sum(1), 75)].mean(0)  # the undarkened phase
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - bright).sum())
        assert nearest == CLASS_ATTRIBUTES[name][0], (name, bright)


def test_stuff_pixels_carry_their_base_colour():
    for i, sid in enumerate(STUFF_IDS * 3):
        scene = render_object(scene_rng(0, "clip_eval", i), sid)
        assert scene.classes == [sid] and (scene.label == sid).all()
        mean = scene.image.reshape(-1, 3).mean(0)
        nearest = min(STUFF, key=lambda s: np.abs(np.array(STUFF[s]) - mean).sum())
        assert nearest == CLASSES[sid], (CLASSES[sid], mean)


def test_textures_differ_in_dark_fraction():
    dark = {t: [] for t in TEXTURES}
    for i in range(64):
        cid = i % len(OBJECTS)
        scene = render_object(scene_rng(2, "clip_eval", i), cid)
        pixels = scene.image[scene.label == cid].astype(float).sum(1)
        dark[CLASS_ATTRIBUTES[OBJECTS[cid]][1]].append((pixels < 0.6 * np.percentile(pixels, 90)).mean())
    means = {t: float(np.mean(v)) for t, v in dark.items()}
    assert means["plain"] < 0.05
    assert means["dotted"] < means["striped"] and means["dotted"] < means["checkered"]
    assert 0.3 < means["striped"] < 0.7 and 0.3 < means["checkered"] < 0.7


def test_split_file_matches_the_generator():
    assert load_split("synthetic").name == "compositional"
    for name in SPLITS:
        split = load_split("synthetic", name)
        assert split.classes == CLASSES and split.name == name
        assert set(split.unseen) & set(OBJECTS) and set(split.unseen) & set(STUFF)  # unseen objects and stuff
    assert load_split("synthetic", "all").unseen == ()


def test_compositional_unseen_objects_compose_seen_attributes():
    split = load_split("synthetic", "compositional")
    seen_objects = [c for c in split.seen if c in CLASS_ATTRIBUTES]
    for name in set(split.unseen) & set(OBJECTS):
        colour, texture = CLASS_ATTRIBUTES[name]
        assert any(CLASS_ATTRIBUTES[c][0] == colour for c in seen_objects), name
        assert any(CLASS_ATTRIBUTES[c][1] == texture for c in seen_objects), name


def test_noncompositional_unseen_objects_show_an_attribute_no_seen_class_shows():
    split = load_split("synthetic", "noncompositional")
    seen_values = {v for c in split.seen if c in CLASS_ATTRIBUTES for v in CLASS_ATTRIBUTES[c]}
    for name in set(split.unseen) & set(OBJECTS):
        assert set(CLASS_ATTRIBUTES[name]) - seen_values, name


@pytest.mark.parametrize("name", SPLITS)
def test_ignored_training_pixels_are_mostly_unseen_categories(name):
    shares = ignored_pixel_shares(load_split("synthetic", name), scenes=60)
    assert shares["unseen_objects"] + shares["unseen_stuff"] >= 0.8 and shares["outlines"] <= 0.2
    assert shares["unseen_objects"] > 0.05
    assert abs(shares["unseen_objects"] + shares["unseen_stuff"] + shares["outlines"] - 1) < 1e-9


def test_offline_default_config_names_the_synthetic_world():
    cfg = load_config("synthetic")
    assert cfg.data.dataset == "synthetic" and cfg.data.crop_size == 64
    assert cfg.data.root.endswith(f"/v{WORLD_VERSION}")  # a new world version never reuses an old cache
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
        known = seen_label[(seen_label != IGNORE_INDEX) & (seen_label != PAD_INDEX)]  # PAD_INDEX: crop padding
        assert (known < len(split.seen)).all()  # unseen pixels became 255


def _build_small_world(root):
    materialize_world(root, seed=4, n_train=30, n_val=3, size=32, progress=False)


def _blocked_on(path, pids: list[int]) -> bool:
    """Every one of ``pids`` waits for a flock on ``path`` (Linux lists waiters in /proc/locks as ``-> FLOCK``)."""
    inode = f":{os.stat(path).st_ino} "
    lines = open("/proc/locks").read().splitlines()
    waiting = {int(line.split()[5]) for line in lines if "-> FLOCK" in line and inode in line}
    return set(pids) <= waiting


def test_concurrent_materialization_waits_for_the_lock_and_reuses_the_world(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    ctx = multiprocessing.get_context("fork")
    with open(root / synthetic.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another "process" is generating
        waiting = [ctx.Process(target=_build_small_world, args=(root,)) for _ in range(2)]
        for p in waiting:
            p.start()
        deadline = time.monotonic() + 120
        while not _blocked_on(root / synthetic.LOCK, [p.pid for p in waiting]):
            assert all(p.is_alive() for p in waiting) and time.monotonic() < deadline, "never waited for the lock"
            time.sleep(0.05)
        assert not (root / "images").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    for p in waiting:
        p.join(timeout=120)
    assert [p.exitcode for p in waiting] == [0, 0]
    assert json.loads((root / synthetic.MARKER).read_text())["n_train"] == 30
    assert len(list((root / "annotations" / "train").iterdir())) == 30
    assert not list(root.glob(".building-*")) and not list(root.glob(f".{synthetic.MARKER}.*"))
    label = np.asarray(Image.open(root / "annotations" / "train" / "train_000029.png"))
    assert np.array_equal(label, render_scene(scene_rng(4, "train", 29), 32).label)


def test_an_interrupted_build_is_discarded(tmp_path):
    root = tmp_path / "w"
    (root / ".building-12345" / "images").mkdir(parents=True)  # a generator killed mid-way
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "train_000099.png").write_bytes(b"partial")  # no marker: never trusted
    _build_small_world(root)
    assert not (root / ".building-12345").exists()
    assert sorted(p.name for p in (root / "images" / "train").iterdir())[-1] == "train_000029.png"
