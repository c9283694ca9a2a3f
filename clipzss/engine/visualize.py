"""Pictures people would rather look at than read: segmentation overlays with a legend, pseudo-label maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_COLOUR = (0, 0, 0)


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8 [n, 3]), the PASCAL bit-interleaving palette extended deterministically."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def denormalise(image: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float [3, H, W] -> uint8 [H, W, 3]."""
    rgb = image.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def colourise(label: np.ndarray, num_colours: int, ignore_index: int = 255) -> np.ndarray:
    """Label map [H, W] -> RGB uint8 [H, W, 3]; ignore pixels are black."""
    colours = palette(max(num_colours, 1))
    out = colours[np.clip(label, 0, len(colours) - 1)]
    out[label == ignore_index] = IGNORE_COLOUR
    return out


def overlay(rgb: np.ndarray, label: np.ndarray, num_colours: int, opacity: float = 0.5) -> np.ndarray:
    """Blend a colourised label map over an RGB image (ignore pixels keep the image)."""
    mask = colourise(label, num_colours).astype(np.float32)
    blended = rgb.astype(np.float32) * (1 - opacity) + mask * opacity
    keep = (label == 255)[..., None]
    return np.where(keep, rgb, blended).round().astype(np.uint8)


def with_legend(picture: np.ndarray, names: Sequence[str], ids: Sequence[int], num_colours: int) -> np.ndarray:
    """Append a legend column naming the colour of each class id in ``ids``."""
    font = ImageFont.load_default()
    row = 14
    width = 12 + max((int(font.getlength(names[i])) for i in ids), default=0) + 20
    height = max(picture.shape[0], row * len(ids) + 4)
    canvas = Image.new("RGB", (picture.shape[1] + width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(max(num_colours, 1))
    for k, i in enumerate(ids):
        x, y = picture.shape[1] + 4, 2 + k * row
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(c) for c in colours[i]))
        draw.text((x + 14, y - 1), names[i], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def side_by_side(*pictures: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate RGB pictures horizontally with a white gap, padding heights."""
    height = max(p.shape[0] for p in pictures)
    parts = []
    for p in pictures:
        padded = np.full((height, p.shape[1], 3), 255, dtype=np.uint8)
        padded[: p.shape[0]] = p
        parts += [padded, np.full((height, gap, 3), 255, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def upscale(picture: np.ndarray, min_side: int = 192) -> np.ndarray:
    """Nearest-neighbour enlargement so that tiny (e.g. 64 px) scenes are legible."""
    factor = max(1, int(np.ceil(min_side / min(picture.shape[:2]))))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def prediction_panel(
    image: np.ndarray, target: np.ndarray, pred: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()
) -> np.ndarray:
    """Image | ground truth | prediction, with a legend of the classes present (unseen marked with *)."""
    rgb = denormalise(image)
    if rgb.shape[:2] != target.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize(target.shape[::-1], Image.BILINEAR))
    n = len(names)
    panel = side_by_side(upscale(rgb), upscale(overlay(rgb, target, n)), upscale(overlay(rgb, pred, n)))
    present = sorted(set(np.unique(target).tolist() + np.unique(pred).tolist()) - {255})
    labels = [f"{name}*" if i in set(unseen_ids) else name for i, name in enumerate(names)]
    return with_legend(panel, labels, present, n)


def pseudo_label_panel(image: np.ndarray, seen_label: np.ndarray, fused: np.ndarray, num_seen: int) -> np.ndarray:
    """Image | seen labels | fused labels F (seen ids, then potential classes Ns + k)."""
    rgb = denormalise(image)
    n = int(max(fused[fused != 255].max(initial=0), seen_label[seen_label != 255].max(initial=0))) + 1
    return side_by_side(upscale(rgb), upscale(overlay(rgb, seen_label, n)), upscale(overlay(rgb, fused, n)))


def confusion_picture(matrix: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()) -> np.ndarray:
    """Row-normalised confusion matrix (ground truth x prediction) as an RGB picture; unseen names marked with *."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.astype(np.float64)
    rows = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    labels = [f"{name}*" if i in set(unseen_ids) else name for i, name in enumerate(names)]
    side = max(4.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture
