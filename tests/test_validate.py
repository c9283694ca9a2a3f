"""Every bad-input case is reported by validate (all at once) and raised by the dataset (fail fast), same text."""

import numpy as np
import pytest
from dataset_fixtures import write_voc_fixture
from PIL import Image

from clipzss.config import DataConfig
from clipzss.data.datasets import DatasetError, build_dataset
from clipzss.data.validate import format_problems, validate_dataset


def corrupt_image(root):
    path = root / "JPEGImages" / "train_0001.jpg"
    path.write_bytes(b"this is not a jpeg")
    return path, "corrupt or truncated image", "train"


def truncated_image(root):
    path = root / "JPEGImages" / "val_0000.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, "corrupt or truncated image", "val"


def label_out_of_range(root):
    path = root / "SegmentationClassAug" / "train_0002.png"
    label = np.array(Image.open(path))
    label[5, 5] = 30
    Image.fromarray(label).save(path)
    return path, "label value(s) 30 outside the classes (0..20 or 255", "train"


def size_mismatch(root):
    path = root / "SegmentationClass" / "val_0001.png"
    Image.open(path).resize((10, 10), Image.NEAREST).save(path)
    return path, "size mismatch: label is 10x10", "val"


def split_names_missing_file(root):
    (root / "SegmentationClass" / "ghost.png").write_bytes((root / "SegmentationClass" / "val_0000.png").read_bytes())
    with open(root / "ImageSets" / "Segmentation" / "val.txt", "a") as f:
        f.write("ghost\n")
    return root / "JPEGImages" / "ghost.jpg", "missing file (listed as 'ghost'", "val"


def missing_split_file(root):
    path = root / "ImageSets" / "Segmentation" / "aug.txt"
    path.unlink()
    return path, "train split file not found", "train"


def empty_split(root):
    path = root / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n")
    return path, "empty val split", "val"


def float_image(root):
    path = root / "JPEGImages" / "train_0003.jpg"
    size = Image.open(path).size
    Image.new("F", size, 0.5).save(path, "TIFF")  # Pillow reads by content, not by the name's suffix
    return path, "32-bit float image (Pillow mode F)", "train"


CASES = [corrupt_image, truncated_image, label_out_of_range, size_mismatch, float_image]
CASES += [split_names_missing_file, missing_split_file, empty_split]


@pytest.mark.parametrize("break_it", CASES)
def test_validate_and_dataset_report_the_same_problem(tmp_path, break_it):
    root = write_voc_fixture(tmp_path)
    path, problem, mode = break_it(root)

    problems = validate_dataset("voc", root, progress=False)
    assert len(problems) == 1, format_problems(problems)
    assert problems[0].path == str(path) and problem in problems[0].message

    with pytest.raises(DatasetError) as error:
        data = build_dataset(DataConfig(root=str(root), crop_size=16, scale=(96, 40)), mode)
        for i in range(len(data)):
            data[i]
    assert str(problems[0]) in str(error.value)


def test_validate_reports_every_problem_at_once(tmp_path):
    root = write_voc_fixture(tmp_path)
    expected = [case(root) for case in (corrupt_image, truncated_image, label_out_of_range, size_mismatch)]
    expected.append(split_names_missing_file(root))
    problems = validate_dataset("voc", root, progress=False)
    assert len(problems) == len(expected)
    for path, problem, _ in expected:
        assert any(p.path == str(path) and problem in p.message for p in problems), (path, problem)
    text = format_problems(problems)
    assert str(expected[0][0]) in text and text.endswith(f"{len(expected)} problem(s) found")


def test_missing_root_and_clean_dataset(tmp_path):
    problems = validate_dataset("voc", tmp_path / "nowhere", progress=False)
    assert len(problems) == 1 and "dataset root not found" in problems[0].message
    assert "VOCdevkit/VOC2012" in problems[0].message
    with pytest.raises(DatasetError, match="nowhere: dataset root not found"):
        build_dataset(DataConfig(root=str(tmp_path / "nowhere")), "val")
    assert format_problems(validate_dataset("voc", write_voc_fixture(tmp_path), progress=False)) == "no problems found"


def test_rgb_label_is_reported(tmp_path):
    root = write_voc_fixture(tmp_path)
    path = root / "SegmentationClass" / "val_0000.png"
    Image.open(path).convert("RGB").save(path)
    problems = validate_dataset("voc", root, progress=False)
    assert [p.path for p in problems] == [str(path)] and "not a single-channel PNG (mode RGB)" in problems[0].message
