"""Every Pillow mode becomes faithful 8-bit RGB or a refusal naming the file: in to_rgb, the dataset and `segment`."""

import io

import numpy as np
import pytest
from dataset_fixtures import write_voc_fixture
from PIL import Image

from clipzss.cli import main as cli
from clipzss.config import DataConfig
from clipzss.data.datasets import build_dataset
from clipzss.data.images import ImageModeError, ImageReadError, open_image, to_rgb
from clipzss.data.validate import validate_dataset
from clipzss.engine.segmenter import OpenVocabSegmenter

GRADIENT = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)  # 0 .. 57300: spans the 16-bit range


def reopened(image: Image.Image, fmt: str = "PNG") -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    buffer.seek(0)
    return Image.open(buffer)


def test_a_16_bit_png_keeps_its_greys():
    image = reopened(Image.fromarray(GRADIENT))
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    expected = np.round(GRADIENT / 257).astype(np.uint8)
    assert rgb.shape == (12, 16, 3) and np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.min() == 0 and rgb.max() == expected.max()


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> the white background
        (Image.new("RGBA", (2, 2), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("LA", (2, 2), (40, 0)), (255, 255, 255)),
        (Image.new("LA", (2, 2), (40, 255)), (40, 40, 40)),
        (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("HSV", (2, 2), (0, 255, 255)), (255, 0, 0)),
        (Image.new("I", (2, 2), 65535), (255, 255, 255)),
    ],
)
def test_modes_convert_to_the_colour_they_show(image, pixel):
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == pixel


def test_palette_transparency_and_lab_are_honoured():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    assert np.asarray(to_rgb(Image.new("LAB", (1, 1), (255, 128, 128)))).min() >= 250  # L=100: white, not grey


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_mode_pillow_knows_converts_or_is_refused_by_name(mode):
    try:
        rgb = to_rgb(Image.new(mode, (3, 2)), "pic.tif")
    except ImageModeError as e:
        assert str(e).startswith("pic.tif: ") and mode in str(e)
    else:
        assert rgb.mode == "RGB" and rgb.size == (3, 2)


def test_out_of_range_32_bit_and_float_images_are_refused():
    with pytest.raises(ImageModeError, match=r"a\.tif: 32-bit integer image \(mode I\) with values 0\.\.70000"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "a.tif")
    with pytest.raises(ImageModeError, match=r"b\.tif: 32-bit float image \(Pillow mode F\)"):
        to_rgb(Image.new("F", (1, 1)), "b.tif")


def test_dataset_and_validate_read_a_16_bit_image_faithfully(tmp_path):
    root = write_voc_fixture(tmp_path, size=(12, 16))
    path = root / "JPEGImages" / "val_0000.jpg"
    Image.fromarray(GRADIENT).save(path, "PNG")
    assert validate_dataset("voc", root, progress=False) == []
    image = build_dataset(DataConfig(root=str(root), test_short_side=12), "val")[0]["image"]  # normalised [3, H, W]
    assert image.shape == (3, 12, 16) and image.std() > 0.5  # a gradient, not a white page


def test_segment_reads_a_16_bit_png_and_refuses_duplicate_classes(trained_run, tmp_path, capsys):
    path = tmp_path / "deep.png"
    Image.fromarray(GRADIENT).save(path)
    segmenter = OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt")
    eight_bit = Image.fromarray(np.round(GRADIENT / 257).astype(np.uint8))
    assert np.allclose(segmenter.preprocess(Image.open(path)), segmenter.preprocess(eight_bit), atol=0.02)
    assert cli(["segment", str(path), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat,sky",
                "--out", str(tmp_path / "seg")]) == 0  # fmt: skip
    assert cli(["segment", str(path), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat,sky, cat"]) == 1
    assert "error: class name(s) given more than once: cat (each class needs one name)" in capsys.readouterr().err


def test_open_image_caps_pixels_on_the_header_and_leaves_pillow_s_limit_as_it_was(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(GRADIENT).save(path)  # 16 x 12
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError, match=r"wide\.png: 16 x 12 = 0\.000192 MP is over the 0\.000191 MP limit"):
        open_image(path, max_pixels=191)
    assert open_image(path, max_pixels=192).size == (16, 12) and Image.MAX_IMAGE_PIXELS == pillow_limit
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageReadError, match=r"folder: is a directory"):
        open_image(tmp_path / "folder")
    with pytest.raises(ImageReadError, match=r"cannot read image .*missing\.png"):
        open_image(tmp_path / "missing.png")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit
