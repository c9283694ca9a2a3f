"""Open-vocabulary segmentation with a trained student: the Python API behind ``clipzss segment`` / ``eval``.

Only the student runs on images. CLIP's text tower embeds the vocabulary once; no CLIP image forward at test time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipzss.config import Config, from_dict
from clipzss.data.images import DEFAULT_MAX_PIXELS, open_image, to_rgb
from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipzss.engine.checkpoint import load_model_bundle
from clipzss.engine.inference import slide_logits
from clipzss.engine.mlflow_flavor import load_student
from clipzss.engine.visualize import segmentation_panel
from clipzss.models.students import build_student
from clipzss.models.teacher import CLIPTeacher
from clipzss.paths import resolve_path

SYNTHETIC_TEACHER = "@assets/synthetic_clip.json"
DISPLAY_SIDE = 2048  # the overlay picture is drawn from at most this many pixels a side


def known_vocabulary(teacher_model: str) -> tuple[str, ...] | None:
    """The only names a teacher can read, for the shipped synthetic one (its captions name 16 categories);
    None for a real CLIP, whose vocabulary is open."""
    if resolve_path(teacher_model) != resolve_path(SYNTHETIC_TEACHER):
        return None
    from clipzss.data.synthetic import CLASSES

    return CLASSES


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], elements: int = 2**21) -> np.ndarray:
    """``F.interpolate(logits, size, bilinear).argmax(0)`` computed a band of rows at a time, so memory stays at about
    ``elements`` floats however large ``size`` is (full-size logits take 4 N bytes a pixel).

    Args:
        logits: [N, h, w] at the network's resolution.
        size: (H, W) of the labels.

    Returns:
        class ids [H, W] (uint8 when N <= 256, else int32), equal to the full-size computation: the same
        horizontal interpolation (PyTorch's), then the same vertical weights (align_corners=False, as in PyTorch).
    """
    n, h, w = logits.shape
    height, width = size
    src = ((torch.arange(height, dtype=torch.float32) + 0.5) * (h / height) - 0.5).clamp(min=0)  # source row, [H]
    top = src.floor().long().clamp(max=h - 1)
    bottom = (top + 1).clamp(max=h - 1)
    low = (src - top).to(logits.dtype)[:, None]  # weight of the bottom row, [H, 1]
    labels = np.empty(size, dtype=np.uint8 if n <= 256 else np.int32)
    band = max(1, elements // max(1, n * width))
    for y0 in range(0, height, band):
        y1 = min(y0 + band, height)
        r0, r1 = int(top[y0]), int(bottom[y1 - 1]) + 1  # the source rows this band reads
        rows = F.interpolate(logits[None, :, r0:r1], (r1 - r0, width), mode="bilinear", align_corners=False)[0]
        a, b = rows[:, top[y0:y1] - r0], rows[:, bottom[y0:y1] - r0]  # [N, band, W]
        labels[y0:y1] = ((1 - low[y0:y1]) * a + low[y0:y1] * b).argmax(0).cpu().numpy()
    return labels


class OpenVocabSegmenter:
    """A trained student plus text embeddings of a vocabulary.

    Example:
        >>> seg = OpenVocabSegmenter.from_checkpoint("runs/synthetic/model.pt")
        >>> seg.set_vocabulary(["red star", "blue ring"])
        >>> labels = seg.segment(Image.open("scene.png"))   # [H, W] ids into the vocabulary
    """

    def __init__(
        self,
        cfg: Config,
        student: torch.nn.Module,
        alpha: float,
        text_encoder: CLIPTeacher,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.student = student.to(self.device).eval()
        self.alpha = alpha
        self._text_encoder = text_encoder  # only its text tower is used
        self.vocabulary: list[str] = []
        self.text = torch.empty(0)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> OpenVocabSegmenter:
        """Load an exported ``model.pt`` (or a training checkpoint) with its saved config."""
        bundle = load_model_bundle(path)
        cfg = from_dict(bundle["config"])
        text_encoder = CLIPTeacher(cfg.teacher)
        saved_dim = bundle.get("embed_dim")
        if saved_dim is not None and saved_dim != text_encoder.embed_dim:
            raise ValueError(
                f"{path}: the student was trained for {saved_dim}-d CLIP embeddings, but its teacher "
                f"{cfg.teacher.model!r} ({cfg.teacher.pretrained or 'random init'}) gives {text_encoder.embed_dim}-d "
                "ones: the bundle and that teacher do not belong together"
            )
        student = build_student(cfg.student, text_encoder.embed_dim)
        try:
            student.load_state_dict(bundle["student"])
        except RuntimeError as e:
            raise ValueError(f"{path}: the weights do not fit the student its config builds ({e})") from e
        return cls(cfg, student, float(bundle.get("alpha", cfg.loss.alpha)), text_encoder, device)

    @classmethod
    def from_mlflow(
        cls, uri: str, device: str | torch.device = "cpu", trust_pickle: bool = False
    ) -> OpenVocabSegmenter:
        """Load a student logged by training as an MLflow model (``runs:/<run id>/student``, ``models:/...``) from
        MLflow's current tracking store: its architecture is built by clipzss and only its weights are read.

        Args:
            trust_pickle: load a model logged as a pickled module (``mlflow.pytorch``), which runs whatever code the
                pickle carries; without it such a model raises ``PickledModelError``.
        """
        loaded = load_student(uri, trust_pickle)
        return cls(loaded.cfg, loaded.student, loaded.alpha, CLIPTeacher(loaded.cfg.teacher), device)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        model: str | None = None,
        tracking_uri: str | None = None,
        trust_pickle: bool = False,
        device: str | torch.device = "cpu",
    ) -> OpenVocabSegmenter:
        """A segmenter from a ``checkpoint`` file or an MLflow ``model`` URI (exactly one), the CLI's and notebooks'
        one call: ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``) is the model's store."""
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of a checkpoint file or an MLflow model URI")
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint, device)
        from clipzss.engine.tracking import current_store, default_uri

        with current_store(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()):
            return cls.from_mlflow(model, device, trust_pickle)

    def set_vocabulary(self, class_names: Sequence[str]) -> None:
        """Embed the class names once (prompt ensemble); every later ``segment`` call reuses them."""
        names = [n.strip() for n in class_names if n.strip()]
        if not names:
            raise ValueError("the vocabulary is empty: give at least one class name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"class name(s) given more than once: {', '.join(repeated)} (each class needs one name)")
        known = known_vocabulary(self.cfg.teacher.model)
        unknown = [n for n in names if known is not None and n not in known]
        if unknown:
            print(
                f"warning: this student's teacher ({self.cfg.teacher.model}) was pretrained on captions naming only "
                f"{len(known)} categories ({', '.join(known)}); {', '.join(map(repr, unknown))} are words it never "
                "saw, so their segments are arbitrary. Use those names, or a student trained with a real CLIP.",
                file=sys.stderr,
            )
        self.vocabulary = names
        self.text = self._text_encoder.encode_text(names).to(self.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> normalised [3, H', W'] with the short side resized to ``data.test_short_side``."""
        rgb = to_rgb(image)
        short = self.cfg.data.test_short_side
        scale = short / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
        array = (np.asarray(rgb, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(array.transpose(2, 0, 1).copy()).float()

    @torch.no_grad()
    def segment(self, image: Image.Image) -> np.ndarray:
        """Class ids [H, W] (at the input image's size) into ``self.vocabulary``."""
        if not self.vocabulary:
            raise RuntimeError("call set_vocabulary(...) before segment(...)")
        tensor = self.preprocess(image).to(self.device)
        d = self.cfg.data
        logits = slide_logits(self.student, tensor[None], self.text, self.alpha, d.test_window, d.test_stride)
        return upsampled_argmax(logits[0], image.size[::-1])

    def overlay_with_legend(self, image: Image.Image, labels: np.ndarray) -> np.ndarray:
        """Image | segmentation, titled, with a legend of the classes present; drawn from a copy of at most
        ``DISPLAY_SIDE`` pixels a side (the panels are a few hundred pixels wide)."""
        scale = DISPLAY_SIDE / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            rows = ((np.arange(size[1]) + 0.5) * image.height / size[1]).astype(np.int64)  # nearest source pixels
            cols = ((np.arange(size[0]) + 0.5) * image.width / size[0]).astype(np.int64)
            image, labels = image.resize(size, Image.BOX), labels[np.ix_(rows, cols)]
        return segmentation_panel(np.asarray(to_rgb(image)), labels, self.vocabulary)

    def segment_file(self, path: str | Path, out_dir: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
        """Segment one image file and write ``<out_dir>/<stem>_seg.png`` (overlay + legend).

        Raises:
            ImageReadError: the file is unreadable or has more than ``max_pixels`` pixels (checked before decoding).
        """
        path = Path(path)
        image = open_image(path, max_pixels)
        labels = self.segment(image)
        out = Path(out_dir) / f"{path.stem}_seg.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.overlay_with_legend(image, labels)).save(out)
        return out
