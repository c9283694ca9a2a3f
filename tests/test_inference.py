"""Test-time segmentation with the student alone: sliding windows, the Python API and the CLI commands."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dataset_fixtures import write_dataset_fixture
from PIL import Image

from clipzss.cli import main as cli
from clipzss.engine.inference import predict, slide_logits
from clipzss.engine.segmenter import OpenVocabSegmenter, upsampled_argmax
from clipzss.method.objective import seen_logits
from clipzss.models.teacher import CLIPTeacher


class Pointwise(torch.nn.Module):
    """A per-pixel student (a 1x1 conv): any window layout must reproduce its full-image output."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return F.normalize(self.proj(x), dim=1)


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 10), (24, 7), (64, 64)])
def test_sliding_windows_match_a_single_full_forward(window, stride):
    torch.manual_seed(0)
    student, text = Pointwise(), F.normalize(torch.randn(5, 8), dim=-1)
    image = torch.randn(1, 3, 37, 50)
    expected = seen_logits(student(image), text, 10.0)
    got = slide_logits(student, image, text, 10.0, window, stride)
    assert got.shape == (1, 5, 37, 50)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_segmenter_runs_the_student_only(trained_run, monkeypatch):
    segmenter = OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt")
    segmenter.set_vocabulary(["cat", "grass", "sky"])
    # After the vocabulary is embedded, CLIP's image tower must never run again.
    monkeypatch.setattr(CLIPTeacher, "forward", lambda *a, **k: pytest.fail("CLIP image forward at test time"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    labels = segmenter.segment(image)
    assert labels.shape == (45, 61) and labels.min() >= 0 and labels.max() < 3


@pytest.mark.parametrize(
    ("n", "low", "high", "elements"),
    [(3, (8, 8), (45, 61), 2**23), (26, (16, 21), (997, 1301), 5000), (5, (10, 7), (10, 7), 1),
     (300, (4, 4), (33, 17), 999), (4, (16, 16), (8, 8), 50)],
)  # fmt: skip
def test_banded_upsampled_argmax_equals_the_full_size_one(n, low, high, elements):
    logits = torch.randn(n, *low, generator=torch.Generator().manual_seed(n))
    full = F.interpolate(logits[None], high, mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    got = upsampled_argmax(logits, high, elements)  # elements < N * W: one row a band
    assert got.shape == high and np.array_equal(got, full) and got.dtype == (np.uint8 if n <= 256 else np.int32)


def test_segment_equals_the_evaluation_s_predict(trained_run):
    segmenter = OpenVocabSegmenter.from_checkpoint(trained_run / "model.pt")
    segmenter.set_vocabulary(["cat", "grass", "sky", "dog"])
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 95, 3), dtype=np.uint8))
    d = segmenter.cfg.data
    tensor = segmenter.preprocess(image)
    expected = predict(
        segmenter.student, tensor, segmenter.text, segmenter.alpha, d.test_window, d.test_stride, (70, 95)
    )
    assert np.array_equal(segmenter.segment(image), expected.numpy())


def test_segment_cli_writes_overlay_with_legend(trained_run, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "seg"
    assert cli(["segment", str(image), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat, dog,sky",
                "--out", str(out)]) == 0  # fmt: skip
    written = out / "scene_seg.png"
    assert str(written) in capsys.readouterr().out
    picture = np.asarray(Image.open(written))
    assert picture.shape[1] > 2 * 192  # image | overlay, each enlarged, plus a legend column


def test_segment_cli_names_an_unreadable_image(trained_run, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert cli(["segment", str(bad), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat"]) == 1
    assert f"error: cannot read image {bad}: cannot identify image file" in capsys.readouterr().err


def test_eval_cli_on_own_split_and_cross_dataset(trained_run, tmp_path, capsys):
    assert cli(["eval", "--checkpoint", str(trained_run / "model.pt"), "--cpu"]) == 0
    own = capsys.readouterr().out
    assert "hIoU" in own and "pottedplant" in own  # VOC's unseen classes are evaluated
    context = write_dataset_fixture("context59", tmp_path / "ctx", n_train=1, n_val=2, size=(36, 40))
    assert cli(["eval", "context59", "--root", str(context), "--checkpoint", str(trained_run / "model.pt")]) == 0
    cross = capsys.readouterr().out
    assert "bedclothes" in cross  # the other dataset's own vocabulary


def test_the_benchmark_measures_segment_at_the_pixel_cap_in_a_fresh_process():
    from clipzss.bench.inference import segment_peak_memory

    figures = segment_peak_memory(30_000)  # accepted: an image exactly at the cap is not over it
    assert 29_000 < figures["pixels"] <= 30_000
    assert 0 < figures["loaded_gb"] <= figures["peak_gb"] < 8 and figures["bytes_per_pixel"] >= 0
