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
from clipzss.export import MIN_AGREEMENT, BakedClassifier, export_onnx, export_verified
from clipzss.method.objective import seen_logits
from clipzss.models.students import build_student
from clipzss.onnx_variants import (
    MIN_VARIANT_AGREEMENT,
    VARIANTS,
    build_variants,
    compare_variants,
    fastest_agreeing,
    scene_images,
)
from clipzss.runtime import ONNXSegmenter, resize_bilinear


def test_resize_bilinear_matches_torch():
    array = np.random.default_rng(0).normal(size=(3, 7, 10)).astype(np.float32)
    for size in [(21, 30), (5, 4), (7, 25)]:
        expected = F.interpolate(torch.from_numpy(array)[None], size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(resize_bilinear(array, size), expected.numpy(), atol=1e-5)


def test_baked_classifier_is_the_scaled_cosine_upsampled():
    student = build_student(StudentConfig(arch="segformer_tiny"), 16).eval()
    text = torch.randn(5, 16)
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got = BakedClassifier(student, text, alpha=20.0)(images)
        expected = F.interpolate(seen_logits(student(images), text, 20.0), (64, 48), mode="bilinear")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_variants_agreement_timing_and_choice(tmp_path):
    """Every variant builds on a real student graph, is timed and checked; the choice is the fastest agreeing one."""
    student = build_student(StudentConfig(arch="segformer_tiny"), 16).eval()
    model = BakedClassifier(student, torch.randn(5, 16), alpha=20.0).eval()
    export_onnx(model, tmp_path / "model.onnx", (64, 64), dynamic_size=False)
    check = scene_images(2, 64, "val")
    paths = build_variants(tmp_path / "model.onnx", tmp_path, scene_images(2, 64, "train"))
    assert set(paths) == set(VARIANTS)
    rows = compare_variants(paths, model, check, check[:1])
    by_name = {r["variant"]: r for r in rows}
    assert by_name["fp32"]["argmax_agreement"] >= MIN_AGREEMENT
    assert by_name["fp32 optimised offline"]["argmax_agreement"] >= MIN_AGREEMENT
    assert all(0 < r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
    chosen = fastest_agreeing(rows)
    assert chosen["argmax_agreement"] >= MIN_VARIANT_AGREEMENT
    assert chosen["ms"] == min(r["ms"] for r in rows if r["argmax_agreement"] >= MIN_VARIANT_AGREEMENT)
    disagreeing = [{**r, "argmax_agreement": 0.5} if r is not rows[0] else r for r in rows]
    assert fastest_agreeing(disagreeing)["variant"] == "fp32"  # no variant below 99% ships, however fast


def test_export_cli_and_standalone_loader_match_the_torch_segmenter(trained_run, tmp_path, capsys):
    out = tmp_path / "deploy"
    classes = "cat,dog,sky,grass"
    assert cli(["export", "--checkpoint", str(trained_run / "model.pt"), "--classes", classes, "--out", str(out)]) == 0
    spec = json.loads((out / "deploy.json").read_text())
    assert spec["classes"] == classes.split(",") and spec["input_size"] is None  # SegFormer: dynamic size
    assert all(c["argmax_agreement"] >= MIN_AGREEMENT for c in spec["checks"]) and len(spec["checks"]) == 2
    variants = {v["variant"]: v for v in spec["variants"]}
    assert spec["variant"] in variants and "fp32" in variants and spec["intra_op_threads"] >= 1
    assert variants[spec["variant"]]["argmax_agreement"] >= MIN_VARIANT_AGREEMENT
    assert f"{spec['variant']:24s}" in capsys.readouterr().out  # the choice is printed with every variant's figures
    # the deployed graph must match torch as closely as the variant it is
    agreement = MIN_AGREEMENT if spec["variant"].startswith("fp32") else MIN_VARIANT_AGREEMENT
    # a non-square image larger than the window: resize, several sliding windows, logits resized back
    pixels = np.random.default_rng(1).integers(0, 255, (45, 83, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    reference = OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt")
    reference.set_vocabulary(classes.split(","))
    expected = reference.segment(image)
    got = ONNXSegmenter(out).segment(image)
    assert got.shape == expected.shape == (45, 83)
    assert (got == expected).mean() >= agreement
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
    assert (saved == expected).mean() >= agreement and "scene_labels.png" in done.stdout


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
