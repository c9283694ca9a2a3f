"""Pictures that explain themselves: titled panels, class overlays on the image, a legend naming every colour.

One style per class everywhere (validation panels, PLM panels, confusion matrices, ``clipzss segment``, notebooks),
keyed by the class *name*, never by its position in a vocabulary: "sky" keeps its colour in a picture of 26 classes
and in one of three. A name with a colour word ("red striped") is drawn in that colour; names that share the word get
shades of it and a pattern each (the texture word picks it: striped -> stripes, dotted -> dots, checkered -> checks),
so "red striped" and "red dotted" differ at a glance. Other names take distinct colours from a catalogue of every
class of the shipped datasets (VOC classes get their usual VOC colours), and names outside it a colour derived from
the name. Ignored pixels (label 255: never scored) show the image in dim grey. Pictures are sized for MLflow's
~600-px previews: few panels, and text that stays at least 12 px tall there.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

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
PATTERNS = ("", "stripes", "dots", "checks")
# The texture word of a colour-named class picks its pattern and shade (0 = the pure colour, < 0 darker, > 0 lighter).
TEXTURE_STYLES: dict[str, tuple[str, float]] = {
    "plain": ("", 0.0),
    "striped": ("stripes", -0.25),
    "dotted": ("dots", 0.3),
    "checkered": ("checks", -0.4),
}
# The first catalogue colours, for the synthetic world's stuff: far from the hues of its colour-named objects and from
# the grey of ignored pixels.
CATALOGUE_COLOURS = ((245, 130, 48), (70, 220, 230), (0, 128, 128), (128, 128, 0), (250, 190, 212), (128, 64, 0))
HATCHES = {"": "", "stripes": "///", "dots": "..", "checks": "++"}  # the legend's pattern for each picture pattern
DISPLAY = 256  # px: the long side labels are painted at, so patterns and outlines look the same in every picture
DPI = 100
PREVIEW_WIDTH = 600  # px: how wide MLflow's image grid and artifact previews show a picture
PREVIEW_TEXT = 12  # px: the smallest text height wanted at that preview width
Legend = list[tuple[str, "ClassStyle"]]
# Fonts tried, in order, for characters DejaVu Sans lacks (class names in other scripts).
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Droid Sans Fallback", "WenQuanYi Zen Hei", "Noto Sans")
_WARNED: set[str] = set()


@dataclass(frozen=True)
class ClassStyle:
    """How a class is drawn: an RGB colour and a pattern (one of :data:`PATTERNS`; ``""`` is solid)."""

    colour: tuple[int, int, int]
    pattern: str = ""


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


@functools.cache
def _catalogue() -> dict[str, tuple[int, int, int]]:
    """Every class name of the shipped splits without a colour word -> its colour: the synthetic world's stuff first
    (:data:`CATALOGUE_COLOURS`), then VOC's 20 classes in the VOC palette, then the other datasets' names."""
    from clipzss.data.splits import available_datasets, load_split

    order = ["synthetic", "voc", *(d for d in available_datasets() if d not in ("synthetic", "voc"))]
    names = [n for d in order for n in load_split(d).classes if _colour_word(n) is None]
    names = list(dict.fromkeys(names))
    synthetic = [n for n in load_split("synthetic").classes if _colour_word(n) is None]
    colours = dict(zip(synthetic, CATALOGUE_COLOURS, strict=False))
    rest = [n for n in names if n not in colours]
    palette = pascal_palette(len(rest) + 1)  # VOC's palette: class i of VOC gets VOC's colour i + 1
    colours.update({n: tuple(int(c) for c in palette[i]) for i, n in enumerate(rest)})
    return colours


def _colour_word(name: str) -> str | None:
    return next((w for w in _words(name) if w in COLOUR_WORDS), None)


def _words(name: str) -> list[str]:
    return name.lower().replace("-", " ").replace("_", " ").split()


def _digest(text: str) -> int:
    """A stable number from ``text`` (Python's ``hash`` changes between processes)."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "little")


@functools.cache
def class_style(name: str) -> ClassStyle:
    """The colour and pattern of class ``name``, the same in every picture and for every vocabulary."""
    word = _colour_word(name)
    if word is None:
        known = _catalogue().get(name)
        if known is not None:
            return ClassStyle(known)
        hue = (_digest(name) % 360) / 360  # names outside the catalogue: a bright colour of their own
        import colorsys

        return ClassStyle(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.9)))
    rest = " ".join(w for w in _words(name) if w != word)
    pattern, shade = TEXTURE_STYLES.get(rest, (PATTERNS[_digest(rest) % len(PATTERNS)], 0.0))
    base = np.asarray(COLOUR_WORDS[word], dtype=np.float64)
    colour = base + shade * (255 - base) if shade > 0 else base * (1 + shade)
    return ClassStyle(tuple(int(c) for c in colour.round()), pattern)


def class_colours(names: Sequence[str]) -> np.ndarray:
    """uint8 [N, 3]: the colour of each name (:func:`class_style`)."""
    return np.asarray([class_style(n).colour for n in names], dtype=np.uint8).reshape(-1, 3)


def cluster_styles(n: int) -> list[ClassStyle]:
    """Styles for ``n`` nameless clusters (K-Means): distinct palette colours, no patterns."""
    return [ClassStyle(tuple(int(c) for c in rgb)) for rgb in pascal_palette(n)]


def denormalise(image: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float [3, H, W] -> uint8 [H, W, 3]."""
    rgb = image.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def to_display(rgb: np.ndarray, *labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The image resized to the labels' size, then image and labels scaled so that the long side is :data:`DISPLAY`
    (labels by nearest neighbour): patterns and outlines are drawn at the size they are seen."""
    from PIL import Image

    height, width = labels[0].shape
    scale = DISPLAY / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    big = [np.asarray(Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST)) for label in labels]
    return (image, *big)


def _pattern_mask(shape: tuple[int, int], pattern: str) -> np.ndarray:
    """bool [H, W]: where ``pattern`` draws its second tone (8-px cells)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    if pattern == "stripes":
        return (xx + yy) % 8 < 3
    if pattern == "dots":
        return (xx % 8 - 3.5) ** 2 + (yy % 8 - 3.5) ** 2 <= 3.5
    if pattern == "checks":
        return (xx // 4 + yy // 4) % 2 == 0
    return np.zeros(shape, dtype=bool)


def _tone(colour: Sequence[int]) -> np.ndarray:
    """The second tone of a pattern: the colour pushed halfway to white (dark colours) or black (light ones)."""
    rgb = np.asarray(colour, dtype=np.float64)
    luminance = rgb @ (0.299, 0.587, 0.114)
    return rgb + 0.5 * (255 - rgb) if luminance < 128 else rgb * 0.5


def paint(label: np.ndarray, styles: Sequence[ClassStyle], rgb: np.ndarray) -> np.ndarray:
    """Label map [H, W] -> RGB [H, W, 3]: each id in its style (colour and pattern), ignored pixels as the image in
    dim grey."""
    grey = rgb.astype(np.float32).mean(-1, keepdims=True) * 0.35 + np.asarray(IGNORED_COLOUR) * 0.65
    ignored = label == IGNORE_INDEX
    ids = np.where(ignored, 0, np.clip(label, 0, len(styles) - 1))
    painted = np.asarray([s.colour for s in styles], dtype=np.float64)[ids]
    for i in np.unique(ids[~ignored]).tolist():
        if styles[i].pattern:
            mask = (ids == i) & ~ignored & _pattern_mask(label.shape, styles[i].pattern)
            painted[mask] = _tone(styles[i].colour)
    return np.where(ignored[..., None], grey, painted).round().astype(np.uint8)


def overlay(rgb: np.ndarray, label: np.ndarray, styles: Sequence[ClassStyle], alpha: float = 0.6) -> np.ndarray:
    """The labels painted over the image (``alpha`` of the class colour), each region outlined in white; ignored
    pixels as in :func:`paint`."""
    painted = paint(label, styles, rgb).astype(np.float64)
    scored = (label != IGNORE_INDEX)[..., None]
    mixed = np.where(scored, alpha * painted + (1 - alpha) * rgb, painted)
    edge = np.zeros(label.shape, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    mixed[edge] = 255
    return mixed.round().astype(np.uint8)


def legend_for(ids: Sequence[int], names: Sequence[str], styles: Sequence[ClassStyle], ignored: bool) -> Legend:
    """Legend rows (text, style) for the class ids shown (and the ignored pixels when some are)."""
    rows = [(names[i], styles[i]) for i in sorted(set(ids))]
    return rows + ([(IGNORED, ClassStyle(IGNORED_COLOUR))] if ignored else [])


def text_size(width_px: int) -> float:
    """Font size (pt) whose letters are :data:`PREVIEW_TEXT` px tall once a ``width_px`` picture is shown
    :data:`PREVIEW_WIDTH` px wide (at least 10 pt at full size)."""
    return max(10.0, PREVIEW_TEXT * width_px / PREVIEW_WIDTH * 72 / DPI)


def render(
    panels: Sequence[tuple[str, np.ndarray]], legend: Legend, title: str = "", columns: int | None = None
) -> np.ndarray:
    """Titled RGB panels in a grid (``columns`` wide, default one row) with a legend below, as an RGB uint8 picture
    (3 in = 300 px per panel) whose text stays readable at MLflow's preview width (:func:`text_size`)."""
    from matplotlib.patches import Patch

    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    width = 3.0 * columns
    font = text_size(int(width * DPI))
    line = font * 1.5 / 72  # inches per line of text
    with text_fonts([n for n, _ in legend] + [n for n, _ in panels] + [title]):
        longest = max((len(n) for n, _ in legend), default=1)
        legend_columns = max(1, min(len(legend), int(width * 72 / (font * (0.55 * longest + 3.5)))))
        legend_height = (-(-len(legend) // legend_columns)) * line + 0.15
        grid_height = rows * (3.0 + line)
        title_height = line * 1.2 if title else 0.0
        height = grid_height + legend_height + title_height
        fig = _figure((width, height), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[len(panels) :]:
            ax.axis("off")
        for ax, (name, picture) in zip(axes, panels, strict=False):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(name, fontsize=font)
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=font * 1.1)
        handles = [
            Patch(
                facecolor=np.asarray(s.colour) / 255, edgecolor=_tone(s.colour) / 255, hatch=HATCHES[s.pattern], label=n
            )  # fmt: skip
            for n, s in legend
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=legend_columns, fontsize=font, frameon=False)
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
    with matplotlib.rc_context({"font.family": font_family(), "hatch.linewidth": 1.5}):
        yield


def _figure(size: tuple[float, float], layout: str | None = None):
    """A matplotlib Figure on its own Agg canvas: pyplot's backend (a notebook's inline one) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def prediction_panel(
    image: np.ndarray, target: np.ndarray, pred: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()
) -> np.ndarray:
    """Image | ground truth over the image | prediction over the image (scored pixels only), with a legend naming
    every class shown.

    Args:
        image: ImageNet-normalised [3, H', W'] (resized to the label size when it differs).
        target: [H, W] class ids or 255; pred: [H, W] class ids.
        names: every class name; unseen_ids: marked "(unseen)" in the legend.
    """
    scored = np.where(target == IGNORE_INDEX, IGNORE_INDEX, pred)
    rgb, big_target, big_scored = to_display(denormalise(image), target, scored)
    styles = [class_style(n) for n in names]
    labels = [f"{n} (unseen)" if i in set(unseen_ids) else n for i, n in enumerate(names)]
    shown = [*np.unique(target).tolist(), *np.unique(scored).tolist()]
    valid = target != IGNORE_INDEX
    accuracy = float((pred == target)[valid].mean() * 100) if valid.any() else 0.0
    return render(
        [
            ("image", rgb),
            ("ground truth", overlay(rgb, big_target, styles)),
            ("prediction", overlay(rgb, big_scored, styles)),
        ],
        legend_for([i for i in shown if i != IGNORE_INDEX], labels, styles, bool((~valid).any())),
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
    """The PLM at work on one image, in four panels over the image: the image, its seen labels, the fused K-Means
    clusters (the K of each scale in the title) and the pseudo labels F.

    Clusters have no names: they take arbitrary colours. In F the seen classes keep their colours and the kept
    clusters become the numbered potential classes.
    """
    from PIL import Image

    stages, fused = plm_stages(dense, torch.as_tensor(label), kmeans, len(seen_names))
    clusters = np.asarray(Image.fromarray(stages[-1][1].astype(np.int32)).resize(label.shape[::-1], Image.NEAREST))
    rgb, seen, fused_clusters, pseudo = to_display(denormalise(image), np.minimum(label, IGNORE_INDEX), clusters, fused)
    potential = int(fused[fused != IGNORE_INDEX].max(initial=len(seen_names) - 1)) + 1 - len(seen_names)
    names = [*seen_names, *(f"potential {k + 1}" for k in range(potential))]
    styles = [class_style(n) for n in names]
    scales = ", ".join(title.split("K=")[1].rstrip(")") for title, _ in stages[:-1])
    panels = [
        ("image", rgb),
        ("seen labels (training)", overlay(rgb, seen, styles)),  # crop padding is drawn as ignored
        (stages[-1][0].replace("fused clusters", "clusters fused"), overlay(rgb, fused_clusters,
                                                                            cluster_styles(int(clusters.max()) + 1))),
        ("pseudo labels F", overlay(rgb, pseudo, styles)),
    ]  # fmt: skip
    shown = [i for i in np.unique(fused).tolist() if i != IGNORE_INDEX]
    legend = legend_for(shown, names, styles, bool((fused == IGNORE_INDEX).any()))
    return render(panels, legend, f"PLM at work: K-Means K = {scales}", columns=2)


def segmentation_panel(rgb: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Image | segmentation into ``names`` over the image, with a legend of the names found."""
    styles = [class_style(n) for n in names]
    image, big = to_display(rgb, labels)
    return render(
        [("image", image), ("segmentation", overlay(image, big, styles))],
        legend_for(np.unique(labels).tolist(), names, styles, False),
    )


def confusion_picture(matrix: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()) -> np.ndarray:
    """Row-normalised confusion matrix (ground truth x prediction) as an RGB picture: each class name beside a swatch
    of its colour; unseen names marked with *."""
    from matplotlib.patches import Rectangle

    rows = matrix.astype(np.float64)
    rows = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    labels = [f"{name}*" if i in set(unseen_ids) else name for i, name in enumerate(names)]
    n = len(names)
    side = max(5.0, 0.3 * n + 2.5)
    with text_fonts(labels):
        fig = _figure((side + 1, side))
        ax = fig.subplots()
        image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
        for i, colour in enumerate(class_colours(names) / 255):  # swatches just outside the matrix, both axes
            ax.add_patch(Rectangle((-1.2, i - 0.4), 0.6, 0.8, color=colour, clip_on=False))
            ax.add_patch(Rectangle((i - 0.4, n - 0.4), 0.8, 0.6, color=colour, clip_on=False))
        if n <= 60:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=9)
            ax.set_yticks(range(n), labels, fontsize=9)
        cell = side * 0.75 * 72 / n  # pt per matrix cell (the axes take ~3/4 of the figure): ticks clear the swatches
        ax.tick_params(axis="both", pad=0.8 * cell)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth (* unseen)")
        ax.set_title("confusion, rows normalised")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        return _pixels(fig)
