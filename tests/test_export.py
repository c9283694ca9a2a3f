"""ONNX export: the deployed graph and its torch-free loader reproduce the torch path."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipzss.cli import main as cli
from clipzss.config import StudentConfig
from clipzss.engine.segmenter import OpenVocabSegmenter
from clipzss.export import MIN_AGREEMENT, BakedClassifier, export_verified
from clipzss.models.students import build_student
from clipzss.runtime import ONNXSegmenter, resize_bilinear


def test_resize_bilinear_matches_torch():
    array = np.random.default_rng(0).normal(size=(3, 7, 10)).astype(np.float32)
    for size in [(21, 30), (5, 4), (7, 25)]:
        expected = F.interpolate(torch.from_numpy(array)[None], size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(resize_bilinear(array, size), expected.numpy(), atol=1e-5)


def test_export_cli_and_standalone_loader_match_the_torch_segmenter(trained_run, tmp_path, capsys):
    out = tmp_path / "deploy"
    classes = "cat,dog,sky,grass"
    assert cli(["export", "--checkpoint", str(trained_run / "model.pt"), "--classes", classes, "--out", str(out)]) == 0
    spec = json.loads((out / "deploy.json").read_text())
    assert spec["classes"] == classes.split(",") and spec["input_size"] is None  # SegFormer: dynamic size
    assert all(c["argmax_agreement"] >= MIN_AGREEMENT for c in spec["checks"]) and len(spec["checks"]) == 2
    # a non-square image larger than the window: resize, several sliding windows, logits resized back
    pixels = np.random.default_rng(1).integers(0, 255, (45, 83, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    reference = OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt")
    reference.set_vocabulary(classes.split(","))
    expected = reference.segment(image)
    got = ONNXSegmenter(out).segment(image)
    assert got.shape == expected.shape == (45, 83)
    assert (got == expected).mean() >= MIN_AGREEMENT
    # the copied loader runs without torch or clipzss, from the export folder alone
    image.save(tmp_path / "scene.png")
    script = (
        "import sys, runpy\n"
        "sys.argv = ['segment.py', sys.argv[1], '--out', sys.argv[2]]\n"
        "try:\n    runpy.run_path('segment.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules and 'clipzss' not in sys.modules, 'the loader imported torch'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "scene.png"), str(tmp_path / "labels")],
        cwd=out, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = np.asarray(Image.open(tmp_path / "labels" / "scene_labels.png"))
    assert (saved == expected).mean() >= MIN_AGREEMENT and "scene_labels.png" in done.stdout


def test_loader_names_a_broken_deploy_file(tmp_path):
    (tmp_path / "deploy.json").write_text(json.dumps({"model": "model.onnx", "classes": ["a"]}))
    with pytest.raises(ValueError, match=r"deploy.json: missing keys \['mean', 'short_side', 'std'"):
        ONNXSegmenter(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["segformer_b0", "resnet50", "swin_tiny"])
def test_real_architecture_exports_match_torch(arch, tmp_path):
    """Every student family at its real size (random init), at the real 512-px window."""
    student = build_student(StudentConfig(arch=arch), 512)
    model = BakedClassifier(student, torch.randn(20, 512), alpha=50.0).eval()
    checks, input_size = export_verified(model, tmp_path / "model.onnx", window=512)
    for check in checks:
        assert check["argmax_agreement"] >= MIN_AGREEMENT, check
        assert check["max_abs_logit_diff"] < 1e-2, check
    assert (input_size is None) == (arch != "swin_tiny")  # Swin's shifted-window mask needs the fixed size
