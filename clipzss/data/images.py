"""Any image Pillow opens, as the 8-bit sRGB picture a model expects, or a refusal naming the file and the mode.

``Image.convert("RGB")`` alone is wrong for several modes: it clips 16-bit grey (``I;16``, ``I``: a 16-bit PNG
becomes all white), copies CIELAB channels as if they were RGB, and drops alpha so that whatever colour hides
under transparent pixels shows. The rules here, one per mode family:

- ``RGB``: a copy. ``1``, ``L``, ``RGBX``, ``YCbCr``, ``HSV``: Pillow's conversion is exact.
- ``CMYK``: through its embedded ICC profile when it has one, else Pillow's naive formula.
- ``LAB``: through a CIELAB -> sRGB colour transform (LittleCMS).
- ``I;16*`` and ``I`` (16-bit grey as Pillow opens PNG/TIFF): scaled 0..65535 -> 0..255; an ``I`` image with
  values outside that range is refused (its scale is unknown).
- Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with transparency): composited over white.
- ``F`` (32-bit float): refused, there is no agreed brightness range.

:func:`open_image` reads a file under a pixel cap checked on the header, before any pixel is decoded: a segmentation
costs tens of bytes per pixel, so a 1 MB PNG of 20,000 x 20,000 pixels would otherwise take gigabytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

EXACT = ("RGB", "1", "L", "RGBX", "YCbCr", "HSV")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
DEFAULT_MAX_PIXELS = 40_000_000  # ~40 MP: a 7,000 x 5,700 photo; segment's peak memory at this size is benchmarked


class ImageModeError(ValueError):
    """An image whose pixel mode cannot be turned into RGB faithfully; the message names the file and mode."""

    def __init__(self, source: str | Path, reason: str):
        super().__init__(f"{source}: {reason}")
        self.reason = reason


class ImageReadError(ValueError):
    """An image file that cannot be read (missing, a folder, truncated, not an image, over the pixel cap)."""


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image file ``path`` decoded as 8-bit RGB (:func:`to_rgb`), refused when larger than ``max_pixels``.

    Pillow's own decompression-bomb limits (a warning over 89 MP, an error over 179 MP) give way to ``max_pixels``
    (checked on the header, before decoding): one number bounds what a caller accepts, above or below them.

    Raises:
        ImageReadError: the file is missing, a directory, not a readable image, or over ``max_pixels``.
        ImageModeError: its pixel mode has no faithful RGB conversion.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the cap below replaces Pillow's
    try:
        with Image.open(path) as raw:
            width, height = raw.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{path}: {width} x {height} = {width * height / 1e6:.4g} MP is over the {max_pixels / 1e6:.4g} MP "
                    "limit (--max-pixels raises it; segmenting costs tens of bytes of memory per pixel)"
                )
            raw.load()
            return to_rgb(raw, path)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: Pillow's broken-header error
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image, source: str | Path = "image") -> Image.Image:
    """``image`` as 8-bit RGB (mode ``"RGB"``), converted by the rules in this module's docstring.

    Args:
        source: the file name (or a description) used in the error message.

    Raises:
        ImageModeError: a float image, a 32-bit integer image beyond 16 bits, or a mode Pillow cannot convert.
    """
    mode = image.mode
    if mode in EXACT:
        return image.convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "LAB":
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    if mode in SIXTEEN_BIT:
        return _sixteen_bit_to_rgb(image, source)
    if mode == "P":
        return _over_white(image.convert("RGBA")) if "transparency" in image.info else image.convert("RGB")
    if mode in WITH_ALPHA:
        return _over_white(image.convert("RGBA") if mode != "La" else image.convert("LA").convert("RGBA"))
    if mode == "F":
        raise ImageModeError(
            source, "32-bit float image (Pillow mode F) has no agreed brightness range; save it as 8-bit RGB"
        )
    raise ImageModeError(source, f"image mode {mode!r} cannot be converted to RGB; save it as 8-bit RGB")


def _sixteen_bit_to_rgb(image: Image.Image, source: str | Path) -> Image.Image:
    values = np.asarray(image).astype(np.int64)  # (H, W)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageModeError(
            source,
            f"32-bit integer image (mode {image.mode}) with values {values.min()}..{values.max()}, beyond "
            "16 bits: its brightness scale is unknown; save it as 8-bit or 16-bit",
        )
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if not icc:
        return image.convert("RGB")
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
