"""An offline zero-shot segmentation world: textured objects whose names compose a colour and a texture.

Each category is ``"{colour} {texture}"`` (``"red striped"``); a scene is a textured background with 1-4
objects of random shape, pose and scale, and a per-pixel label map (class ids in :data:`CLASSES` order,
255 = background, ignored like VOC's). Everything is generated deterministically from a seed, so the
same world can be written to disk for the segmentation loader (:func:`materialize_world`) and streamed
as image-caption pairs for pretraining the tiny CLIP teacher (``clipzss.synthetic_clip``).

The seen/unseen split is data, in ``clipzss/data/splits/synthetic.yaml``: every unseen category is a new
composition of a colour and a texture that seen categories show.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (230, 205, 35),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SHAPES: tuple[str, ...] = ("circle", "triangle", "square", "pentagon", "star", "ellipse")

# Label-id order: colours outer, textures inner.
CLASS_ATTRIBUTES: dict[str, tuple[str, str]] = {f"{c} {t}": (c, t) for c in COLOURS for t in TEXTURES}
CLASSES: tuple[str, ...] = tuple(CLASS_ATTRIBUTES)
IGNORE_INDEX = 255

# Independent random streams, so train, val and CLIP pretraining scenes never coincide.
STREAMS: dict[str, int] = {"train": 0, "val": 1, "clip_train": 2, "clip_eval": 3}
WORLD_VERSION = 1
MARKER = "world.json"

_DARK = 0.35  # brightness of the dark phase of a texture, relative to the object's colour


class Scene(NamedTuple):
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: (H, W) uint8 class ids, 255 = background.
        classes: ids of the objects still visible after occlusion, in painting order.
    """

    image: np.ndarray
    label: np.ndarray
    classes: list[int]


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``stream`` (one of :data:`STREAMS`) in the world of ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"clipzss/data/synthetic.py: unknown stream {stream!r}; allowed: {', '.join(STREAMS)}")
    return np.random.default_rng([seed, STREAMS[stream], index])


def render_scene(
    rng: np.random.Generator,
    size: int = 64,
    classes: list[int] | None = None,
    radius_range: tuple[float, float] = (0.12, 0.3),
    min_visible: int = 12,
) -> Scene:
    """Render a background and objects, later objects painted over earlier ones.

    Args:
        rng: source of all randomness (see :func:`scene_rng`).
        size: image side in pixels.
        classes: class ids of the objects to paint; None draws 1-4 random ones.
        radius_range: object radius range as a fraction of ``size``.
        min_visible: objects with fewer visible pixels are dropped from the label and from ``classes``.

    Returns:
        The :class:`Scene`.
    """
    if classes is None:
        classes = rng.integers(0, len(CLASSES), size=int(rng.integers(1, 5))).tolist()
    image = _background(rng, size)
    label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for cid in classes:
        radius = rng.uniform(*radius_range) * size
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        theta = rng.uniform(0, 2 * math.pi)
        # object-local coordinates (u, v): the shape and its texture rotate together with the pose
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        mask = _shape_mask(u, v, radius, SHAPES[int(rng.integers(len(SHAPES)))], rng)
        colour, texture = CLASS_ATTRIBUTES[CLASSES[cid]]
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 12, 3), 0, 255)
        shade = _texture(u, v, texture, rng)  # (H, W) brightness factor in [_DARK, 1]
        image[mask] = shade[mask, None] * rgb
        label[mask] = cid
    visible = [c for c in dict.fromkeys(classes) if (label == c).sum() >= min_visible]
    label[~np.isin(label, visible)] = IGNORE_INDEX
    image = image + rng.normal(0, 5, image.shape)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), label, [c for c in classes if c in visible])


def render_object(rng: np.random.Generator, class_id: int, size: int = 64) -> Scene:
    """A single, large object of ``class_id`` on the background (zero-shot classification images)."""
    return render_scene(rng, size, classes=[class_id], radius_range=(0.22, 0.35))


def materialize_world(
    root: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 300, size: int = 64, progress: bool = True
) -> Path:
    """Write the world in the generic segmentation layout, unless ``root`` already holds this exact world.

    Layout: ``root/images/{train,val}/NAME.png`` (RGB) and ``root/annotations/{train,val}/NAME.png`` (uint8
    class ids in :data:`CLASSES` order, 255 = background). ``root/world.json`` records the parameters and is
    written last, so an interrupted or differently-parametrised world is regenerated from scratch.

    Args:
        root: output directory (``~`` is expanded).
        seed: world seed.
        n_train: number of training scenes.
        n_val: number of validation scenes.
        size: image side in pixels.
        progress: show a tqdm bar.

    Returns:
        The resolved root.
    """
    root = Path(root).expanduser()
    params = {
        "version": WORLD_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "size": size,
        "classes": list(CLASSES),
    }
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    for sub in ("images", "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
    jobs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for split, i in tqdm(jobs, desc=f"synthetic world -> {root}", disable=not progress, unit="scene"):
        scene = render_scene(scene_rng(seed, split, i), size)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(scene.image).save(root / "images" / split / name)
        Image.fromarray(scene.label).save(root / "annotations" / split / name)
    marker.write_text(json.dumps(params, indent=1))
    return root


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W, 3) float32 muted blotches plus fine grain: textured, but no object colour or texture."""
    coarse = rng.uniform(80, 170, (4, 4, 1)) + rng.normal(0, 8, (4, 4, 3))  # low-saturation greys and browns
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(blotches, np.float32) + rng.normal(0, 10, (size, size, 1)).astype(np.float32)


def _shape_mask(u: np.ndarray, v: np.ndarray, radius: float, shape: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool mask of ``shape`` of circumradius ``radius`` centred at u = v = 0."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if shape == "circle":
        return r <= radius
    if shape == "ellipse":
        return np.hypot(u, v / rng.uniform(0.45, 0.7)) <= radius
    if shape == "star":
        return r <= radius * (0.62 + 0.38 * np.cos(5 * phi))
    sides = {"triangle": 3, "square": 4, "pentagon": 5}[shape]
    sector = 2 * math.pi / sides
    # regular polygon: distance to the nearest edge's normal direction
    return r * np.cos(np.mod(phi, sector) - sector / 2) <= radius * math.cos(math.pi / sides)


def _texture(u: np.ndarray, v: np.ndarray, texture: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 brightness in [_DARK, 1]; periods of 5-7 px, visible inside one 8-px token."""
    period = rng.uniform(5.0, 7.0)
    phase_u, phase_v = rng.uniform(0, period, 2)
    u, v = u + phase_u, v + phase_v
    if texture == "plain":
        dark = np.zeros(u.shape, bool)
    elif texture == "striped":
        dark = np.mod(u, period) < period / 2
    elif texture == "dotted":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        dark = np.hypot(du, dv) < period * 0.28
    elif texture == "checkered":
        cell = period / 2
        dark = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    else:
        raise ValueError(f"clipzss/data/synthetic.py: unknown texture {texture!r}; allowed: {', '.join(TEXTURES)}")
    return np.where(dark, _DARK, 1.0).astype(np.float32)
