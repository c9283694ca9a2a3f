"""Run an exported clipzss segmenter with numpy, onnxruntime and Pillow only (no torch, no clipzss needed).

``clipzss export`` copies this file beside the model as ``segment.py``, so a folder with ``model.onnx``,
``deploy.json`` and ``segment.py`` is the whole deployable artefact:

    python segment.py photo.jpg                      # writes photo_labels.png, prints the classes found
    >>> from segment import ONNXSegmenter
    >>> labels = ONNXSegmenter("DIR").segment(Image.open("photo.jpg"))   # [H, W] ids into the class list

The preprocessing and the sliding windows mirror ``clipzss.engine.segmenter`` / ``clipzss.engine.inference``
step by step (short side resize, ImageNet normalisation, mmseg windows averaged, bilinear resize of the logits
without antialiasing, argmax), so labels match the torch path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] -> [N, H, W], bilinear with half-pixel centres and no antialiasing (torch align_corners=False)."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n_in = array.shape[axis]
        if n_in == out:
            continue
        src = np.clip((np.arange(out) + 0.5) * (n_in / out) - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        weight = (src - lo).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = out
        weight = weight.reshape(shape)
        array = np.take(array, lo, axis=axis) * (1 - weight) + np.take(array, hi, axis=axis) * weight
    return array


class ONNXSegmenter:
    """An exported student + vocabulary: image in, class ids out."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None) -> None:
        folder = Path(folder)
        spec_file = folder / "deploy.json"
        try:
            self.spec = json.loads(spec_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {spec_file}: {e}") from e
        missing = {"model", "classes", "mean", "std", "short_side", "window", "stride"} - set(self.spec)
        if missing:
            raise ValueError(f"{spec_file}: missing keys {sorted(missing)}")
        self.classes: list[str] = self.spec["classes"]
        self.session = ort.InferenceSession(
            str(folder / self.spec["model"]), providers=providers or ort.get_available_providers()
        )
        self.input_name = self.session.get_inputs()[0].name

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> normalised float32 [3, H', W'], short side resized to ``short_side`` (bilinear)."""
        rgb = image.convert("RGB")
        scale = self.spec["short_side"] / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
        mean, std = np.asarray(self.spec["mean"], np.float32), np.asarray(self.spec["std"], np.float32)
        array = (np.asarray(rgb, dtype=np.float32) / 255 - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def logits(self, array: np.ndarray) -> np.ndarray:
        """[3, H, W] -> [N, H, W] logits, averaged over mmseg-style sliding windows."""
        window, stride = self.spec["window"], self.spec["stride"]
        _, height, width = array.shape
        rows = max(height - window + stride - 1, 0) // stride + 1
        cols = max(width - window + stride - 1, 0) // stride + 1
        total = np.zeros((len(self.classes), height, width), np.float32)
        counts = np.zeros((1, height, width), np.float32)
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * stride, max(height - window, 0)), min(c * stride, max(width - window, 0))
                y2, x2 = min(y1 + window, height), min(x1 + window, width)
                total[:, y1:y2, x1:x2] += self._run(array[None, :, y1:y2, x1:x2])
                counts[:, y1:y2, x1:x2] += 1
        return total / counts

    def _run(self, crop: np.ndarray) -> np.ndarray:
        """[1, 3, h, w] -> [N, h, w]; a fixed-size model (``input_size``) gets a smaller crop zero-padded."""
        h, w = crop.shape[-2:]
        fixed = self.spec.get("input_size")
        if fixed and (h, w) != tuple(fixed):
            crop = np.pad(crop, ((0, 0), (0, 0), (0, fixed[0] - h), (0, fixed[1] - w)))
        return self.session.run(None, {self.input_name: crop})[0][0, :, :h, :w]

    def segment(self, image: Image.Image) -> np.ndarray:
        """Class ids [H, W] at the input image's size, into ``self.classes``."""
        logits = self.logits(self.preprocess(image))
        return resize_bilinear(logits, (image.height, image.width)).argmax(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment images with an exported clipzss model (onnxruntime).")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent), help="folder with deploy.json")
    parser.add_argument("--out", default=".", help="where <stem>_labels.png go (pixel value = class id)")
    args = parser.parse_args(argv)
    segmenter = ONNXSegmenter(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.images:
        with Image.open(name) as image:
            labels = segmenter.segment(image)
        target = out / f"{Path(name).stem}_labels.png"
        Image.fromarray(labels.astype(np.uint8 if len(segmenter.classes) <= 256 else np.uint16)).save(target)
        ids, counts = np.unique(labels, return_counts=True)
        found = ", ".join(f"{segmenter.classes[i]} {n / labels.size:.0%}" for i, n in zip(ids, counts, strict=True))
        print(f"{target}: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
