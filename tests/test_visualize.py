"""Pictures: colours that agree with colour names, ignored pixels drawn as ignored, the PLM's own pseudo labels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipzss.config import load_config
from clipzss.data.synthetic import CLASSES
from clipzss.engine.visualize import (
    IGNORED_COLOUR,
    class_colours,
    paint,
    plm_panel,
    plm_stages,
    prediction_panel,
)
from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.teacher import TeacherOutput


def test_colour_names_get_shades_of_their_colour_and_every_class_its_own():
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
    assert len({tuple(c) for c in class_colours(["cat", "dog", "sky"])}) == 3


def test_ignored_pixels_are_grey_and_predictions_there_are_not_shown():
    rgb = np.full((8, 8, 3), 200, np.uint8)
    label = np.full((8, 8), 255)
    label[:4] = 1
    painted = paint(label, class_colours(["a", "b"]), rgb)
    assert (painted[:4] == class_colours(["a", "b"])[1]).all()
    assert np.abs(painted[4:].astype(int) - IGNORED_COLOUR).max() < 50
    names = ["red plain", "blue plain", "green plain"]
    target = np.full((64, 64), 255)
    target[:32] = 0
    pred = np.where(target == 255, 1, 0)  # "blue plain" predicted on the ignored half only
    picture = prediction_panel(np.zeros((3, 64, 64), np.float32), target, pred, names)
    blue, red = class_colours(names)[1], class_colours(names)[0]
    assert not (picture == blue).all(-1).any() and (picture == red).all(-1).sum() > 1000
    assert picture.shape[1] >= 800  # ~300 px per panel


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
    picture = plm_panel(np.zeros((3, 32, 32), np.float32), labels[0].numpy(), dense[0], cfg.plm.kmeans, ["a", "b", "c"])
    assert picture.shape[1] >= 1500  # six titled panels


def test_non_latin_class_names_are_drawn_in_a_fallback_font_not_as_boxes(monkeypatch):
    from clipzss.engine import visualize

    if visualize.undrawable(["猫"]):  # .ci/install installs Debian's fonts-droid-fallback
        pytest.skip("NO CJK FONT INSTALLED: install fonts-droid-fallback (or fonts-noto-cjk) to run this test")
    grey = np.full((16, 16, 3), 128, dtype=np.uint8)

    def legend_picture(name):
        return visualize.render([("image", grey)], [(name, (200, 40, 40))])

    assert not np.array_equal(legend_picture("猫"), legend_picture("犬"))  # real glyphs differ; boxes would not
    monkeypatch.setattr(visualize, "font_family", lambda: ["DejaVu Sans"])  # the check can fail: without fallback
    with pytest.warns(UserWarning, match="no installed font draws"):
        boxes = legend_picture("猫")
    assert np.array_equal(boxes, legend_picture("犬"))  # both are .notdef boxes
