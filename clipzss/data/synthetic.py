"""An offline zero-shot segmentation world: textured objects on a background of nameable "stuff".

A scene is one to three regions of stuff ("grass", "water", ...) that tile the whole image, with 1-4 objects of
random shape, pose and scale painted over them. Every pixel is labelled: objects are ``"{colour} {texture}"``
(``"red striped"``), the background is its stuff category, and only a 1-px ring on each object's outline is
ignore (255), like VOC's void borders. So in training, where unseen categories become 255, the ignored pixels are
unseen objects and unseen stuff, as in COCO-Stuff's inductive split, not a meaningless background.

Label ids follow :data:`CLASSES`: the object categories (colours outer, textures inner), then the stuff
categories. Everything is generated deterministically from a seed, so the same world can be written to disk for the
segmentation loader (:func:`materialize_world`, safe when several processes call it at once) and streamed as
image-caption pairs for pretraining the tiny CLIP teacher (``clipzss.synthetic_clip``).

The seen/unseen splits are data, in ``clipzss/data/splits/synthetic.yaml``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipzss.data.splits import ZeroShotSplit

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (230, 205, 35),
    "purple": (150, 50, 190),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SHAPES: tuple[str, ...] = ("circle", "triangle", "square", "pentagon", "star", "ellipse")
# Stuff: muted base colours, each with its own pattern (see _stuff); no object colour or texture.
STUFF: dict[str, tuple[int, int, int]] = {
    "grass": (95, 125, 55),
    "sand": (195, 175, 125),
    "water": (60, 105, 140),
    "brick": (150, 75, 55),
    "sky": (165, 190, 215),
    "gravel": (125, 120, 112),
}

# Label-id order: object categories (colours outer, textures inner), then stuff.
CLASS_ATTRIBUTES: dict[str, tuple[str, str]] = {f"{c} {t}": (c, t) for c in COLOURS for t in TEXTURES}
OBJECTS: tuple[str, ...] = tuple(CLASS_ATTRIBUTES)
CLASSES: tuple[str, ...] = OBJECTS + tuple(STUFF)
STUFF_IDS: tuple[int, ...] = tuple(range(len(OBJECTS), len(CLASSES)))
IGNORE_INDEX = 255
SPLITS: tuple[str, ...] = ("compositional", "noncompositional")  # the zero-shot splits of synthetic.yaml

# Independent random streams, so train, val, selection and CLIP pretraining scenes never coincide. "select" is the
# selection split: weights, temperatures and schedules are chosen on it, so that val only reports.
STREAMS: dict[str, int] = {"train": 0, "val": 1, "clip_train": 2, "clip_eval": 3, "select": 4}
WORLD_VERSION = 2  # v2: stuff background, outline rings, 5 colours (v1: 16 categories on an ignored background)
MARKER = "world.json"
# The selection split is a world of its own under root/SELECTION_DIR, laid out as a val split (images/val, ...), so
# the loader reads it as ``data.eval_dataset=synthetic data.eval_root=<root>/selection``; adding it leaves the
# train / val scenes and their marker, and so every number measured on them, as they were.
SELECTION_DIR = "selection"
LOCK = ".world.lock"

_DARK = 0.35  # brightness of the dark phase of an object texture, relative to the object's colour


class Scene(NamedTuple):
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: (H, W) uint8 class ids in :data:`CLASSES` order; 255 = the 1-px outline ring of each object.
        classes: the clearly visible categories (objects with >= ``min_visible`` labelled pixels in painting
            order, then stuff covering >= 1/16 of the image), i.e. what a caption names.
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
    stuff: list[int] | None = None,
    radius_range: tuple[float, float] = (0.12, 0.3),
    min_visible: int = 12,
) -> Scene:
    """Render stuff regions, then objects over them (later objects occlude earlier ones), then the outline rings.

    Args:
        rng: source of all randomness (see :func:`scene_rng`).
        size: image side in pixels.
        classes: object class ids to paint; None draws 1-4 random ones.
        stuff: stuff class ids (from :data:`STUFF_IDS`) that tile the background; None draws 1-3 distinct ones.
        radius_range: object radius range as a fraction of ``size``.
        min_visible: objects with fewer labelled pixels are not listed in ``Scene.classes`` (still labelled).

    Returns:
        The :class:`Scene`.
    """
    if classes is None:
        classes = rng.integers(0, len(OBJECTS), size=int(rng.integers(1, 5))).tolist()
    if stuff is None:
        stuff = rng.choice(STUFF_IDS, size=int(rng.integers(1, 4)), replace=False).tolist()
    image, label = _stuff_layout(rng, size, stuff)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for cid in classes:
        if not 0 <= cid < len(OBJECTS):
            raise ValueError(f"clipzss/data/synthetic.py: object class id {cid} not in 0..{len(OBJECTS) - 1}")
        radius = rng.uniform(*radius_range) * size
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        theta = rng.uniform(0, 2 * math.pi)
        # object-local coordinates (u, v): the shape and its texture rotate together with the pose
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        mask = _shape_mask(u, v, radius, SHAPES[int(rng.integers(len(SHAPES)))], rng)
        colour, texture = CLASS_ATTRIBUTES[OBJECTS[cid]]
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 12, 3), 0, 255)
        shade = _texture(u, v, texture, rng)  # (H, W) brightness factor in [_DARK, 1]
        image[mask] = shade[mask, None] * rgb
        label[mask] = cid
    label[_outline(label)] = IGNORE_INDEX
    visible = [c for c in dict.fromkeys(classes) if (label == c).sum() >= min_visible]
    visible += [s for s in stuff if (label == s).sum() >= size * size // 16]
    image = image + rng.normal(0, 5, image.shape)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), label, visible)


def render_object(rng: np.random.Generator, class_id: int, size: int = 64) -> Scene:
    """One category, large (zero-shot classification images): an object on one random stuff, or stuff alone."""
    if class_id in STUFF_IDS:
        return render_scene(rng, size, classes=[], stuff=[class_id])
    return render_scene(rng, size, classes=[class_id], stuff=[int(rng.choice(STUFF_IDS))], radius_range=(0.3, 0.4))


def materialize_world(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 300,
    size: int = 64,
    progress: bool = True,
    n_select: int = 300,
) -> Path:
    """Write the world in the generic segmentation layout, unless ``root`` already holds this exact world.

    Layout: ``root/images/{train,val}/NAME.png`` (RGB) and ``root/annotations/{train,val}/NAME.png`` (uint8
    class ids in :data:`CLASSES` order, 255 = object outlines). ``root/world.json`` records the parameters. The
    selection split (stream "select") is written the same way under ``root/selection`` (as its ``val``), with its
    own marker. Several processes may call this at once on the same root: one generates (under the lock
    ``root/.world.lock``) into a private folder that is renamed into place, then writes the marker atomically; the
    others wait and reuse it. An interrupted or differently-parametrised world is regenerated from scratch.

    Args:
        root: output directory (``~`` is expanded).
        seed: world seed.
        n_train: number of training scenes.
        n_val: number of validation scenes.
        size: image side in pixels.
        progress: show a tqdm bar (and say when waiting for another process).
        n_select: number of selection scenes (as many as the preset's val; independent of ``n_val``, so that a
            world resized for a test keeps its selection split).

    Returns:
        The resolved root.
    """
    root = Path(root).expanduser()
    params = {"version": WORLD_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "size": size}
    params["classes"] = list(CLASSES)
    selection = selection_params(seed, n_select, size)
    if _marker_matches(root, params) and _marker_matches(root / SELECTION_DIR, selection):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a") as lock:
        _acquire(lock, root, progress)
        try:  # another process may have finished either part while we waited
            if not _marker_matches(root, params):
                _generate(root, params, {"train": ("train", n_train), "val": ("val", n_val)}, progress)
            if not _marker_matches(root / SELECTION_DIR, selection):
                _generate(root / SELECTION_DIR, selection, {"val": ("select", selection["n_select"])}, progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def selection_params(seed: int, n_select: int, size: int) -> dict:
    """The marker of the selection split's world: what ``root/selection/world.json`` records."""
    return {"version": WORLD_VERSION, "seed": seed, "stream": "select", "n_select": n_select, "size": size,
            "classes": list(CLASSES)}  # fmt: skip


def selection_root(root: str | Path) -> Path:
    """Where the selection split of the world at ``root`` lives (evaluate on it with ``data.eval_root``)."""
    return Path(root).expanduser() / SELECTION_DIR


def _marker_matches(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _acquire(lock, root: Path, progress: bool) -> None:
    """Take the exclusive lock on ``lock``; say so when another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if progress:
            print(f"synthetic world: another process is generating {root}; waiting for it", flush=True)
        start = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        if progress:
            print(f"synthetic world: {root} ready after {time.monotonic() - start:.0f} s of waiting", flush=True)


def _generate(root: Path, params: dict, folders: dict[str, tuple[str, int]], progress: bool) -> None:
    """Render every scene into ``root/.building-PID``, then rename it into place and write the marker last.

    ``folders`` maps a layout folder (``train``, ``val``) to the stream its scenes come from and their number.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    for stale in root.glob(".building-*"):  # left by an interrupted run (we hold the lock: nobody else builds)
        shutil.rmtree(stale, ignore_errors=True)
    build = root / f".building-{os.getpid()}"
    for folder in folders:
        (build / "images" / folder).mkdir(parents=True)
        (build / "annotations" / folder).mkdir(parents=True)
    jobs = [(folder, stream, i) for folder, (stream, n) in folders.items() for i in range(n)]
    for folder, stream, i in tqdm(jobs, desc=f"synthetic world -> {root}", disable=not progress, unit="scene"):
        scene = render_scene(scene_rng(params["seed"], stream, i), params["size"])
        name = f"{stream}_{i:06d}.png"
        Image.fromarray(scene.image).save(build / "images" / folder / name)
        Image.fromarray(scene.label).save(build / "annotations" / folder / name)
    for sub in ("images", "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (build / sub).rename(root / sub)
    build.rmdir()
    tmp = root / f".{MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps(params, indent=1))
    tmp.replace(root / MARKER)


def ignored_pixel_shares(split: ZeroShotSplit, seed: int = 0, scenes: int = 300, size: int = 64) -> dict[str, float]:
    """What the ignored (255) pixels of training labels are under ``split`` (a ``synthetic`` split), on train scenes.

    Returns:
        ``ignored``: the fraction of all pixels a training label ignores; ``unseen_objects``, ``unseen_stuff``,
        ``outlines``: the shares of those ignored pixels that are unseen objects, unseen stuff, object outlines.
    """
    unseen = np.zeros(256, bool)
    unseen[split.unseen_ids] = True
    counts = np.zeros(3)  # unseen objects, unseen stuff, outlines
    for i in range(scenes):
        label = render_scene(scene_rng(seed, "train", i), size).label
        is_object = label < len(OBJECTS)
        counts += [(unseen[label] & is_object).sum(), (unseen[label] & ~is_object).sum(), (label == IGNORE_INDEX).sum()]
    shares = counts / counts.sum()
    keys = ("unseen_objects", "unseen_stuff", "outlines")
    return {"ignored": float(counts.sum() / (scenes * size * size)), **dict(zip(keys, shares.tolist(), strict=True))}


def _outline(label: np.ndarray) -> np.ndarray:
    """(H, W) bool: object pixels with a 4-neighbour of another label (the 1-px ring of every object)."""
    pad = np.pad(label, 1, mode="edge")
    differs = (
        (pad[:-2, 1:-1] != label) | (pad[2:, 1:-1] != label) | (pad[1:-1, :-2] != label) | (pad[1:-1, 2:] != label)
    )
    return differs & (label < len(OBJECTS))


def _stuff_layout(rng: np.random.Generator, size: int, stuff: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) float32, label (H, W) uint8): ``stuff`` regions, a Voronoi partition with wobbly borders."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    seeds = rng.uniform(0, size, (len(stuff), 2))
    wobble = _smooth_noise(rng, size, cells=3, channels=len(stuff)) * (size / 6)  # (H, W, k)
    dist = np.hypot(xx[..., None] - seeds[:, 0], yy[..., None] - seeds[:, 1]) + wobble  # (H, W, k)
    region = dist.argmin(-1)
    image = np.zeros((size, size, 3), np.float32)
    label = np.zeros((size, size), np.uint8)
    for k, sid in enumerate(stuff):
        if sid not in STUFF_IDS:
            raise ValueError(f"clipzss/data/synthetic.py: stuff class id {sid} not in {STUFF_IDS}")
        mask = region == k
        image[mask] = _stuff(rng, CLASSES[sid], size)[mask]
        label[mask] = sid
    return image, label


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """(H, W, channels) float32 in about [-1, 1]: ``cells`` x ``cells`` random values, bicubically upsampled."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1, channels)).astype(np.float32)
    layers = [np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BICUBIC)) for c in range(channels)]
    return np.stack(layers, -1)


def _stuff(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """(H, W, 3) float32 image of stuff ``name``: its base colour (jittered) times its pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.array(STUFF[name], np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0, 6, 3)
    if name == "grass":  # vertical blades: noise that varies fast across x, slowly along y
        blades = rng.normal(0, 1, (size // 8, size)).astype(np.float32)
        pattern = 1 + 0.22 * np.asarray(Image.fromarray(blades).resize((size, size), Image.BILINEAR))
    elif name == "sand":  # fine grain
        pattern = 1 + 0.08 * rng.normal(0, 1, (size, size)).astype(np.float32)
    elif name == "water":  # horizontal waves with a slow sideways wobble
        period, phase = rng.uniform(5, 8), rng.uniform(0, 2 * math.pi)
        pattern = 1 + 0.18 * np.sin(2 * math.pi * yy / period + 1.5 * np.sin(2 * math.pi * xx / 24) + phase)
    elif name == "brick":  # 12 x 6 px bricks in offset rows, light mortar lines
        oy, ox = rng.uniform(0, 12, 2)
        row = np.floor((yy + oy) / 6)
        mortar = (np.mod(yy + oy, 6) < 1) | (np.mod(xx + ox + 6 * np.mod(row, 2), 12) < 1)
        pattern = np.where(mortar, 1.35, 1.0)
    elif name == "sky":  # smooth gradient with soft clouds
        pattern = 1 + 0.06 * (yy / size - 0.5) + 0.12 * np.clip(_smooth_noise(rng, size, cells=2)[..., 0], 0, None)
    elif name == "gravel":  # pebbles: 4-px cells of random grey levels
        pebbles = rng.uniform(0.7, 1.3, (size // 4 + 1, size // 4 + 1)).astype(np.float32)
        pattern = np.kron(pebbles, np.ones((4, 4), np.float32))[:size, :size]
    else:
        raise ValueError(f"clipzss/data/synthetic.py: unknown stuff {name!r}; allowed: {', '.join(STUFF)}")
    return np.clip(pattern[..., None] * base, 0, 255).astype(np.float32)


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
