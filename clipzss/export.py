"""``clipzss export``: a trained student with its vocabulary baked in, as an ONNX model that onnxruntime runs.

The exported graph maps a normalised image [B, 3, H, W] to logits [B, N, H, W] = alpha * cos(R, T) bilinearly
upsampled to the input size: the student, the N text embeddings T of the vocabulary (the classifier) and the scale
alpha are all inside. Nothing of CLIP, torch or clipzss is needed to run it. The folder written:

    model.onnx    the graph (torch.onnx, dynamo exporter); dynamic batch, and dynamic H, W when verified
    deploy.json   class names, preprocessing (mean/std, short side, window, stride), alpha, the export checks
    segment.py    a copy of ``clipzss/runtime.py``: numpy + onnxruntime + Pillow loader and command line

Every export is checked against the torch path (max abs logit difference, argmax agreement) at the export size
and at a second size. A graph that is wrong at the second size (timm's Swin: its shifted-window mask does not
survive symbolic shapes) is re-exported at the fixed window size; the loader then pads smaller windows. Then the
checked fp32 graph is replaced by the fastest of its onnxruntime variants (optimised offline, int8 dynamic, int8
static) whose argmax agrees with torch on at least 99% of the pixels (``clipzss/onnx_variants.py``); deploy.json
names the variant and lists every variant's agreement and timing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipzss.onnx_variants import deploy_fastest

if TYPE_CHECKING:
    from clipzss.engine.segmenter import OpenVocabSegmenter

MIN_AGREEMENT = 0.999  # fraction of pixels whose argmax must match the torch path


class BakedClassifier(nn.Module):
    """Student + fixed text classifier: [B, 3, H, W] -> logits [B, N, H, W] at the input size.

    The logits are :func:`~clipzss.method.objective.seen_logits`' alpha * cos(R, T), computed as a 1x1 convolution
    by T divided by |R| (itself a 1x1 convolution of R * R by ones): in onnxruntime, normalising the C channels of R
    (ReduceL2) and the einsum took a quarter of SegFormer-B0's graph at 512 px; this form is about 3x faster there.
    """

    def __init__(self, student: nn.Module, text: Tensor, alpha: float) -> None:
        super().__init__()
        self.student = student
        text = F.normalize(text.detach().float(), dim=-1)  # T [N, C]
        self.register_buffer("text", text)
        self.register_buffer("classifier", text[:, :, None, None].clone(), persistent=False)  # [N, C, 1, 1]
        self.register_buffer("ones", torch.ones(1, text.shape[1], 1, 1), persistent=False)  # sums over C
        self.alpha = float(alpha)

    def forward(self, images: Tensor) -> Tensor:
        R = self.student(images)  # [B, C, H/4, W/4]
        norm = F.conv2d(R * R, self.ones).sqrt().clamp_min(1e-12)  # [B, 1, H/4, W/4], F.normalize's eps
        logits = F.conv2d(R, self.classifier) * (self.alpha / norm)  # [B, N, H/4, W/4]
        return F.interpolate(logits, images.shape[-2:], mode="bilinear", align_corners=False)


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int], dynamic_size: bool) -> None:
    """Trace ``model`` with torch.onnx's dynamo exporter; batch is dynamic, H and W too when ``dynamic_size``."""
    example = torch.randn(2, 3, *size)  # batch 2: a batch of 1 would be specialised
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_size:
        dims |= {2: torch.export.Dim("height", min=32, max=8192), 3: torch.export.Dim("width", min=32, max=8192)}
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
        dynamic_shapes={"images": dims}, verbose=False,
    )  # fmt: skip
    program.save(str(path))


@torch.no_grad()
def compare_with_torch(model: nn.Module, onnx_path: Path, sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """Max abs logit difference and argmax agreement of the ONNX graph vs ``model`` on random images of ``sizes``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    checks = []
    for height, width in sizes:
        image = torch.randn(1, 3, height, width, generator=generator)
        expected = model(image).numpy()
        got = session.run(None, {"image": image.numpy()})[0]
        checks.append(
            {
                "size": [height, width],
                "max_abs_logit_diff": float(np.abs(got - expected).max()),
                "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
            }
        )
    return checks


def _second_size(window: int) -> tuple[int, int]:
    """A size unlike the export size in both dimensions (and not square), to catch shapes baked into the graph."""
    return max(32, window * 3 // 4 + 8), window + 24


def export_verified(model: nn.Module, path: Path, window: int) -> tuple[list[dict], list[int] | None]:
    """Export ``model`` with a dynamic image size, or at the fixed ``window`` size if that graph is wrong elsewhere.

    Returns (the checks against torch, the fixed input size or None). Raises RuntimeError if no graph is right.
    """
    size = (window, window)
    # traced at >= 64 px: at 32 the last stage of a stride-32 encoder is one token, which transformers' attention
    # turns into a data-dependent branch that torch.export cannot keep symbolic
    export_onnx(model, path, (max(window, 64),) * 2, dynamic_size=True)
    checks = compare_with_torch(model, path, [size, _second_size(window)])
    input_size = None
    if checks[1]["argmax_agreement"] < MIN_AGREEMENT:
        print(f"the dynamic-size graph is wrong at {checks[1]['size']} ({checks[1]['argmax_agreement']:.1%} argmax "
              f"agreement): re-exporting at the fixed window size {size}")  # fmt: skip
        export_onnx(model, path, size, dynamic_size=False)
        checks = compare_with_torch(model, path, [size])
        input_size = list(size)
    if checks[0]["argmax_agreement"] < MIN_AGREEMENT:
        raise RuntimeError(f"export to {path}: the ONNX graph does not reproduce the torch path: {checks}")
    return checks, input_size


def export_segmenter(source: str | Path | OpenVocabSegmenter, classes: Sequence[str], out: str | Path) -> dict:
    """Write ``out``/model.onnx, deploy.json and segment.py for the vocabulary ``classes``.

    Args:
        source: a checkpoint file, or a loaded segmenter (``OpenVocabSegmenter.load``: a checkpoint or an MLflow
            model, whose weights only are read).

    Returns the deploy.json content. Raises RuntimeError when no export reproduces the torch path.
    """
    from clipzss.engine.segmenter import OpenVocabSegmenter

    segmenter = source if isinstance(source, OpenVocabSegmenter) else OpenVocabSegmenter.from_checkpoint(source)
    segmenter.set_vocabulary(classes)
    model = BakedClassifier(segmenter.student, segmenter.text, segmenter.alpha).eval()
    d = segmenter.cfg.data
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    print(f"exporting {segmenter.cfg.student.arch} with {len(segmenter.vocabulary)} classes ...")
    checks, input_size = export_verified(model, onnx_path, d.test_window)
    deployed = deploy_fastest(model, onnx_path, d.test_window)
    spec = {
        "format": "clipzss-onnx/1",
        "model": onnx_path.name,
        "input": "image [B, 3, H, W] float32, normalised; output logits [B, N, H, W]",
        "input_size": input_size,
        "classes": segmenter.vocabulary,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "short_side": d.test_short_side,
        "window": d.test_window,
        "stride": d.test_stride,
        "alpha": segmenter.alpha,
        "student": segmenter.cfg.student.arch,
        "teacher": segmenter.cfg.teacher.model,
        "checks": checks,
        **deployed,
    }
    (out / "deploy.json").write_text(json.dumps(spec, indent=2))
    shutil.copyfile(Path(__file__).with_name("runtime.py"), out / "segment.py")
    for check in checks:
        print(f"  checked at {check['size']}: max |logit diff| {check['max_abs_logit_diff']:.2e}, "
              f"argmax agreement {check['argmax_agreement']:.4%}")  # fmt: skip
    print(f"wrote {out}/model.onnx, deploy.json, segment.py (run: python {out}/segment.py IMAGE)")
    return spec
