"""Pictures that explain themselves: titled panels, a legend naming every colour, ignored pixels drawn as ignored.

Colours follow the class names: a name with a colour word ("red striped", "blue plain") is drawn in a shade of that
colour (classes sharing the word get distinct shades), other names take distinct colours of the PASCAL palette.
Ignored pixels (label 255: background on VOC and in the synthetic world, never scored) show the image in dim grey,
in the ground truth and in the prediction alike. Pictures are rendered at ~300 px per panel, so the MLflow artifact
viewer shows them readable at their natural size.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from clipzss.config import KMeansConfig
from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
IGNORED = "ignored (not scored)"
IGNORED_COLOUR = (70, 70, 70)
COLOUR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (230, 205, 35),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "brown": (140, 90, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "gray": (150, 150, 150),
}
Legend = list[tuple[str, tuple[int, int, int]]]
# Fonts tried, in order, for characters DejaVu Sans lacks (class names in other scripts).
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Droid Sans Fallback", "WenQuanYi Zen Hei", "Noto Sans")
_WARNED: set[str] = set()


def pascal_palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8 [n, 3]), the PASCAL bit-interleaving palette without its black."""
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


def class_colours(names: Sequence[str]) -> np.ndarray:
    """uint8 [N, 3]: a shade of the name's colour word where it has one, else a PASCAL palette colour."""
    words = [next((w for w in name.lower().replace("-", " ").split() if w in COLOUR_WORDS), None) for name in names]
    colours = pascal_palette(len(names)).astype(np.float64)
    for word in set(words) - {None}:
        members = [i for i, w in enumerate(words) if w == word]
        base = np.asarray(COLOUR_WORDS[word], dtype=np.float64)
        for k, i in enumerate(members):  # shades from darker to lighter, the pure colour in the middle
            t = (k - (len(members) - 1) / 2) / max(len(members), 2)
            colours[i] = base + t * (255 - base) if t > 0 else base * (1 + t)
    return colours.round().astype(np.uint8)


def denormalise(image: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float [3, H, W] -> uint8 [H, W, 3]."""
    rgb = image.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def paint(label: np.ndarray, colours: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Label map [H, W] -> RGB [H, W, 3]: each id in its colour, ignored pixels as the image in dim grey."""
    grey = rgb.astype(np.float32).mean(-1, keepdims=True) * 0.35 + np.asarray(IGNORED_COLOUR) * 0.65
    ignored = label == IGNORE_INDEX
    painted = colours[np.where(ignored, 0, np.clip(label, 0, len(colours) - 1))]
    return np.where(ignored[..., None], grey, painted).round().astype(np.uint8)


def legend_for(ids: Sequence[int], names: Sequence[str], colours: np.ndarray, ignored: bool) -> Legend:
    """Legend rows for the class ids shown (and the ignored pixels when some are)."""
    rows = [(names[i], tuple(int(c) for c in colours[i])) for i in sorted(set(ids))]
    return rows + ([(IGNORED, IGNORED_COLOUR)] if ignored else [])


def render(panels: Sequence[tuple[str, np.ndarray]], legend: Legend, title: str = "") -> np.ndarray:
    """A row of titled RGB panels with a legend below them, as an RGB uint8 picture (~300 px per panel)."""
    from matplotlib.patches import Patch

    with text_fonts([n for n, _ in legend] + [n for n, _ in panels] + [title]):
        longest = max((len(n) for n, _ in legend), default=1)
        columns = max(1, min(len(legend), int(3 * len(panels) / (0.6 + 0.085 * longest))))  # entries fit the width
        legend_rows = -(-len(legend) // columns)
        fig = _figure((3 * len(panels), 3.4 + 0.25 * legend_rows))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (name, picture) in zip(axes[0], panels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(name, fontsize=11)
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=12)
        handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in legend]
        fig.legend(handles=handles, loc="lower center", ncols=columns, fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0.27 * legend_rows / (3.4 + 0.25 * legend_rows) + 0.02, 1, 1))
        return _pixels(fig)


def font_family() -> list[str]:
    """Matplotlib's default font, then the installed fonts for other scripts (CJK...): matplotlib draws each glyph
    in the first font of the list that has it."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


@functools.cache
def _drawable_characters(family: tuple[str, ...]) -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    paths = {f.fname for f in font_manager.fontManager.ttflist if f.name in family}
    return frozenset(code for path in paths for code in FT2Font(path).get_charmap())


def undrawable(texts: Sequence[str]) -> dict[str, str]:
    """The texts with characters no font of :func:`font_family` has (they would show as boxes): text -> those."""
    known = _drawable_characters(tuple(font_family()))
    missing = {t: "".join(sorted({c for c in t if not c.isspace() and ord(c) not in known})) for t in texts}
    return {t: chars for t, chars in missing.items() if chars}


@contextmanager
def text_fonts(texts: Sequence[str]):
    """Draw inside with the fallback fonts; warn (once per text) about characters no installed font has."""
    import matplotlib

    for text, chars in undrawable(texts).items():
        if text not in _WARNED:
            _WARNED.add(text)
            warnings.warn(
                f"{text!r}: no installed font draws {chars!r}, so it shows as boxes in pictures; install a font for "
                "that script (Debian: fonts-noto-cjk or fonts-droid-fallback for Chinese/Japanese/Korean)",
                stacklevel=3,
            )
    with matplotlib.rc_context({"font.family": font_family()}):
        yield


def _figure(size: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas: pyplot's backend (a notebook's inline one) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def prediction_panel(
    image: np.ndarray, target: np.ndarray, pred: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()
) -> np.ndarray:
    """Image | ground truth | prediction (scored pixels only), with a legend naming every class shown.

    Args:
        image: ImageNet-normalised [3, H', W'] (resized to the label size when it differs).
        target: [H, W] class ids or 255; pred: [H, W] class ids.
        names: every class name; unseen_ids: marked "(unseen)" in the legend.
    """
    from PIL import Image

    rgb = denormalise(image)
    if rgb.shape[:2] != target.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize(target.shape[::-1], Image.BILINEAR))
    scored = np.where(target == IGNORE_INDEX, IGNORE_INDEX, pred)
    colours = class_colours(names)
    labels = [f"{n} (unseen)" if i in set(unseen_ids) else n for i, n in enumerate(names)]
    shown = [*np.unique(target).tolist(), *np.unique(scored).tolist()]
    ignored = bool((target == IGNORE_INDEX).any())
    accuracy = float((pred == target)[target != IGNORE_INDEX].mean() * 100) if (~(target == IGNORE_INDEX)).any() else 0
    return render(
        [("image", rgb), ("ground truth", paint(target, colours, rgb)), ("prediction", paint(scored, colours, rgb))],
        legend_for([i for i in shown if i != IGNORE_INDEX], labels, colours, ignored),
        f"pixel accuracy {accuracy:.0f}% on the scored pixels",
    )


def plm_stages(
    dense: torch.Tensor, label: torch.Tensor, kmeans: KMeansConfig, num_seen: int
) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """The PLM step by step on one image: K-Means clusters of each scale, the fused clusters, and F.

    The same calls as ``PLM.pseudo_labels`` (multi-scale K-Means, fusion, merge with the seen labels), keeping what
    each step produced.

    Args:
        dense: D [C, h', w'] teacher dense tokens of one image (normalised).
        label: [H, W] seen ids, 255 or PAD_INDEX (crop padding, never a potential class).
        kmeans: the K-Means section of the config (scales, iterations, fusion threshold, drop ratio).
        num_seen: Ns.

    Returns:
        ([(title, cluster map [h', w'])] per scale then the fused clusters, F [H, W] as numpy).
    """
    from clipzss.data.transforms import PAD_INDEX
    from clipzss.method.kmeans import multiscale_kmeans
    from clipzss.method.pseudo_labels import fuse_clusters, fused_labels

    with torch.no_grad():
        result = multiscale_kmeans(dense[None].float(), kmeans.scales, kmeans.iters)
        assign, num_clusters, _ = fuse_clusters(result, kmeans.fuse_threshold, kmeans.fusion)
        clusters = assign.view(1, *result.grid)
        label = label[None].long()
        fused = fused_labels(
            label.clamp(max=IGNORE_INDEX), clusters, num_seen, kmeans.drop_seen_ratio, label == PAD_INDEX
        )
        fused = fused[0]
    stages = [
        (f"K-Means window {s} (K={int(a.max()) + 1})", a.view(result.grid).cpu().numpy())
        for s, a in zip(result.scales, (a[0] for a in result.assignments), strict=True)
    ]
    stages.append((f"fused clusters ({int(num_clusters[0])})", clusters[0].cpu().numpy()))
    return stages, fused.cpu().numpy()


def plm_panel(
    image: np.ndarray, label: np.ndarray, dense: torch.Tensor, kmeans: KMeansConfig, seen_names: Sequence[str]
) -> np.ndarray:
    """Image | seen labels | K-Means per scale | fused clusters | pseudo labels F: the PLM at work on one image.

    Cluster maps use arbitrary colours (clusters have no names); in F the seen classes keep their colours and the
    kept clusters become the numbered potential classes.
    """
    from PIL import Image

    rgb = denormalise(image)
    stages, fused = plm_stages(dense, torch.as_tensor(label), kmeans, len(seen_names))
    cluster_colours = pascal_palette(max(int(max(m.max() for _, m in stages)) + 1, 1))
    panels = [("image", rgb)]
    for title, clusters in stages:
        big = np.asarray(Image.fromarray(clusters.astype(np.uint8)).resize(label.shape[::-1], Image.NEAREST))
        panels.append((title, cluster_colours[big]))
    potential = int(fused[fused != IGNORE_INDEX].max(initial=len(seen_names) - 1)) + 1 - len(seen_names)
    names = [*seen_names, *(f"potential {k + 1}" for k in range(potential))]
    colours = np.concatenate(
        [class_colours(seen_names), pascal_palette(len(seen_names) + potential)[len(seen_names) :]]
    )
    panels[1:1] = [("seen labels (training)", paint(np.minimum(label, IGNORE_INDEX), colours, rgb))]  # pad: ignored
    panels.append(("pseudo labels F", paint(fused, colours, rgb)))
    shown = [i for i in np.unique(fused).tolist() if i != IGNORE_INDEX]
    return render(panels, legend_for(shown, names, colours, bool((fused == IGNORE_INDEX).any())), "PLM at work")


def segmentation_panel(rgb: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Image | segmentation into ``names``, with a legend of the names found."""
    colours = class_colours(names)
    return render(
        [("image", rgb), ("segmentation", paint(labels, colours, rgb))],
        legend_for(np.unique(labels).tolist(), names, colours, False),
    )


def confusion_picture(matrix: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()) -> np.ndarray:
    """Row-normalised confusion matrix (ground truth x prediction) as an RGB picture; unseen names marked with *."""
    rows = matrix.astype(np.float64)
    rows = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    labels = [f"{name}*" if i in set(unseen_ids) else name for i, name in enumerate(names)]
    side = max(4.0, 0.28 * len(names) + 2)
    with text_fonts(labels):
        fig = _figure((side + 1, side))
        ax = fig.subplots()
        image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
        if len(names) <= 60:
            ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), labels, fontsize=7)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth (* unseen)")
        ax.set_title("confusion, rows normalised")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        return _pixels(fig)
