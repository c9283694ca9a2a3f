"""Pictures: one style per class name in every picture, shades of a colour told apart by pattern, overlays that show
ignored pixels as ignored, the PLM's own pseudo labels, text readable at MLflow's preview size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipzss.config import load_config
from clipzss.data.synthetic import CLASSES
from clipzss.engine.visualize import (
    DPI,
    IGNORED_COLOUR,
    PREVIEW_TEXT,
    PREVIEW_WIDTH,
    class_colours,
    class_style,
    confusion_picture,
    overlay,
    paint,
    plm_panel,
    plm_stages,
    prediction_panel,
    segmentation_panel,
    text_size,
)
from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.teacher import TeacherOutput


def test_colour_names_get_shades_of_their_colour_and_every_class_its_own_style():
    hue_holds = {
        "red": lambda c: c.argmax() == 0,
        "green": lambda c: c.argmax() == 1,
        "blue": lambda c: c.argmax() == 2,
        "yellow": lambda c: min(c[0], c[1]) > c[2] + 60,  # red and green high, blue low
        "purple": lambda c: min(c[0], c[2]) > c[1] + 40,  # red and blue above green
    }
    colours = class_colours(CLASSES).astype(int)
    for name, rgb in zip(CLASSES, colours, strict=True):
        word = name.split()[0]
        if word in hue_holds:
            assert hue_holds[word](rgb), (name, rgb)
    assert len({tuple(c) for c in colours}) == len(CLASSES)
    assert len({class_style(n) for n in ["cat", "dog", "sky", "a new name"]}) == 4
    striped, dotted = class_style("red striped"), class_style("red dotted")
    assert {striped.pattern, dotted.pattern, class_style("red plain").pattern} == {"stripes", "dots", ""}
    assert len({class_style(f"{c} {t}").pattern for c in ("blue", "green") for t in ("plain", "checkered")}) == 2


def test_a_class_keeps_its_colour_whatever_the_vocabulary():
    assert (class_colours(["sky"]) == class_colours(CLASSES)[CLASSES.index("sky")]).all()
    assert (class_colours(["cat", "red striped"])[1] == class_colours(CLASSES)[CLASSES.index("red striped")]).all()
    assert tuple(class_colours(["aeroplane"])[0]) == (128, 0, 0)  # VOC classes keep VOC's own colours


def _has(picture: np.ndarray, colour, at_least: int = 40) -> bool:
    """The picture holds a patch of exactly ``colour`` (a legend swatch or a confusion swatch)."""
    return int((picture == np.asarray(colour, dtype=np.uint8)).all(-1).sum()) >= at_least


def test_every_picture_type_gives_a_class_the_same_colour():
    sky, striped = class_style("sky").colour, class_style("red striped").colour
    image = np.zeros((3, 32, 32), np.float32)
    target = np.full((32, 32), CLASSES.index("sky"))
    target[:8] = CLASSES.index("red striped")
    val = prediction_panel(image, target, target, CLASSES)  # the val vocabulary: all 26 classes
    seen = [c for c in CLASSES if c not in ("red striped", "water")]  # the PLM's: seen classes only
    cfg = load_config("synthetic", ["plm.kmeans.scales=[2, 4]"])
    dense = F.normalize(torch.randn(16, 8, 8), dim=0)
    plm = plm_panel(image, np.full((32, 32), seen.index("sky")), dense, cfg.plm.kmeans, seen)
    vocabulary = ["cat", "red striped", "sky"]  # a user's, for `clipzss segment`
    rgb = np.full((32, 32, 3), 128, np.uint8)
    segment = segmentation_panel(rgb, np.where(target == CLASSES.index("sky"), 2, 1), vocabulary)
    no_sky = segmentation_panel(rgb, np.ones((32, 32), int), vocabulary)
    confusion = confusion_picture(np.eye(3, dtype=int) * 5, ["grass", "sky", "red striped"])
    for name, picture in [("val", val), ("plm", plm), ("segment", segment), ("confusion", confusion)]:
        assert _has(picture, sky), name
    for name, picture in [("val", val), ("segment", segment), ("confusion", confusion)]:
        assert _has(picture, striped), name
    assert not _has(no_sky, sky, at_least=1) and _has(no_sky, striped)  # a class not shown has no swatch


def test_shades_of_one_colour_differ_by_pattern_where_painted():
    label = np.zeros((16, 32), int)
    label[:, 16:] = 1
    styles = [class_style("red striped"), class_style("red dotted")]
    painted = paint(label, styles, np.zeros((16, 32, 3), np.uint8))
    for half, style in ((painted[:, :16], styles[0]), (painted[:, 16:], styles[1])):
        assert len({tuple(p) for p in half.reshape(-1, 3)}) == 2  # the colour and its pattern's second tone
        assert (half == style.colour).all(-1).mean() > 0.5
    assert not np.array_equal(painted[:, :16], painted[:, 16:])


def test_ignored_pixels_are_grey_and_predictions_there_are_not_shown():
    rgb = np.full((8, 8, 3), 200, np.uint8)
    label = np.full((8, 8), 255)
    label[:4] = 1
    styles = [class_style("a"), class_style("b")]
    painted = overlay(rgb, label, styles)
    assert np.abs(painted[5:].astype(int) - IGNORED_COLOUR).max() < 50
    expected = 0.6 * np.asarray(styles[1].colour) + 0.4 * 200  # the class colour over the image
    assert np.abs(painted[:3].astype(float) - expected).max() < 1.5
    names = ["red plain", "blue plain", "green plain"]
    target = np.full((64, 64), 255)
    target[:32] = 0
    pred = np.where(target == 255, 1, 0)  # "blue plain" predicted on the ignored half only
    picture = prediction_panel(np.zeros((3, 64, 64), np.float32), target, pred, names)
    blue, red = class_style("blue plain").colour, class_style("red plain").colour
    assert not _has(picture, blue, at_least=1) and _has(picture, red)  # no blue, not even in the legend


def test_pictures_read_at_mlflows_preview_size():
    for width in (600, 900, 1200):
        assert text_size(width) * DPI / 72 * PREVIEW_WIDTH / width >= PREVIEW_TEXT
    cfg = load_config(None, ["plm.kmeans.scales=[2, 4]", "plm.synthesizer.heads=2", "glm.weight=0"])
    dense = F.normalize(torch.randn(16, 8, 8), dim=0)
    labels = np.full((32, 32), 255)
    labels[:10] = 1
    picture = plm_panel(np.zeros((3, 32, 32), np.float32), labels, dense, cfg.plm.kmeans, ["a", "b", "c"])
    assert picture.shape[1] <= PREVIEW_WIDTH * 1.1  # four panels in two rows: previewed near full size
    val = prediction_panel(np.zeros((3, 32, 32), np.float32), labels, labels, ["a", "b", "c"])
    assert val.shape[1] <= 1.5 * PREVIEW_WIDTH + 1


def test_plm_stages_give_the_objectives_pseudo_labels():
    cfg = load_config(None, ["plm.kmeans.scales=[2, 4]", "plm.synthesizer.heads=2", "glm.weight=0"])
    num_seen, C = 3, 16
    objective = CLIPZSSObjective(cfg, torch.randn(num_seen, C))
    dense = F.normalize(torch.randn(2, C, 8, 8), dim=1)
    labels = torch.full((2, 32, 32), 255)
    labels[:, :10] = 1
    fused = objective.pseudo_labels(TeacherOutput(cls=torch.zeros(2, C), dense=dense), labels)
    for i in range(2):
        stages, mine = plm_stages(dense[i], labels[i], cfg.plm.kmeans, num_seen)
        assert np.array_equal(mine, fused[i].numpy())
        assert [title.split(" (")[0] for title, _ in stages] == [
            "K-Means window 2",
            "K-Means window 4",
            "fused clusters",
        ]


def test_non_latin_class_names_are_drawn_in_a_fallback_font_not_as_boxes(monkeypatch):
    from clipzss.engine import visualize

    if visualize.undrawable(["猫"]):  # .ci/install installs Debian's fonts-droid-fallback
        pytest.skip("NO CJK FONT INSTALLED: install fonts-droid-fallback (or fonts-noto-cjk) to run this test")
    grey = np.full((16, 16, 3), 128, dtype=np.uint8)

    def legend_picture(name):
        return visualize.render([("image", grey)], [(name, visualize.ClassStyle((200, 40, 40)))])

    assert not np.array_equal(legend_picture("猫"), legend_picture("犬"))  # real glyphs differ; boxes would not
    monkeypatch.setattr(visualize, "font_family", lambda: ["DejaVu Sans"])  # the check can fail: without fallback
    with pytest.warns(UserWarning, match="no installed font draws"):
        boxes = legend_picture("猫")
    assert np.array_equal(boxes, legend_picture("犬"))  # both are .notdef boxes
