"""Bad input meets a CLI, not a traceback: one ``error:`` line naming what, which key or file and what to do, exit 1;
``--debug`` or ``CLIPZSS_DEBUG=1`` shows the traceback. Through the real commands."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_run import tiny_overrides

from clipzss.cli import main as cli
from clipzss.config import Config, ConfigError, flatten, load_config

CLIPZSS = str(Path(sys.executable).with_name("clipzss"))  # the installed console command
FLOAT_KEYS = [key for key, value in flatten(Config()).items() if isinstance(value, float)]


def _error_line(err: str) -> str:
    """The one ``error:`` line of a failed command (and proof that no traceback came with it)."""
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def _bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header says ``side`` x ``side`` (400 MP at 20,000) in a few hundred bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(b"\0" * (3 * side + 1) * 4)  # a few rows: decoding the rest would be the bomb
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _photo(path: Path, size: tuple[int, int] = (40, 48)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_a_non_finite_value(key):
    for value in ("inf", "-inf", "nan"):
        with pytest.raises(ConfigError, match=rf"{key}: must be a finite number, got (-?inf|nan)"):
            load_config(None, [f"{key}={value}"])


def test_the_float_keys_are_found_in_the_schema():
    assert {"optim.lr", "glm.weight", "loss.alpha", "plm.kmeans.fuse_threshold"} <= set(FLOAT_KEYS)


def test_train_with_lr_inf_is_one_error_before_anything_runs(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", *tiny_overrides(assets, out), "optim.lr=inf"]) == 1
    err = capsys.readouterr().err
    assert _error_line(err) == "error: invalid configuration value(s):"
    assert "\n  optim.lr: must be a finite number, got inf" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("items", "names"),
    [
        (["student.arch=resnet9000"], "student.arch"),
        (["data.batch_size=-1"], "data.batch_size"),
        (["optim.lrr=0.1"], "optim.lrr"),
        (["data.dataset=imagenet22k"], "imagenet22k"),
    ],
)
def test_bad_training_input_names_its_key(assets, tmp_path, capsys, items, names):
    assert cli(["train", *tiny_overrides(assets, tmp_path / "run"), *items]) == 1
    err = capsys.readouterr().err
    _error_line(err)
    assert names in err


def test_a_decompression_bomb_is_refused_by_name_and_limit_before_decoding(trained_run, tmp_path, capsys):
    bomb = _bomb_png(tmp_path / "bomb.png")
    args = ["segment", str(bomb), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat", "--out"]
    assert cli([*args, str(tmp_path / "seg")]) == 1
    err = capsys.readouterr().err
    line = _error_line(err)
    assert "bomb.png: 20000 x 20000 = 400 MP is over the 40 MP limit (--max-pixels raises it" in line, err
    assert not (tmp_path / "seg").exists()


def test_max_pixels_sets_the_limit_either_way(trained_run, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png", (60, 80))  # 4,800 pixels
    args = ["segment", str(photo), "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat,sky"]
    assert cli([*args, "--max-pixels", "4799", "--out", str(tmp_path / "low")]) == 1
    assert "photo.png: 80 x 60 = 0.0048 MP is over the 0.004799 MP limit" in capsys.readouterr().err
    assert cli([*args, "--max-pixels", "4800", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "photo_seg.png").exists() and not (tmp_path / "low").exists()


def test_a_batch_segments_every_readable_image_and_names_every_failure(trained_run, tmp_path, capsys):
    a, c = _photo(tmp_path / "a.png"), _photo(tmp_path / "c.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    out = tmp_path / "seg"
    images = [str(a), str(bad), str(folder), str(c)]
    assert cli(["segment", *images, "--checkpoint", str(trained_run / "model.pt"), "--classes", "cat,sky",
                "--out", str(out)]) == 1  # fmt: skip
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.png", "c_seg.png"]
    assert str(out / "a_seg.png") in captured.out and str(out / "c_seg.png") in captured.out
    assert _error_line(captured.err) == "error: 2 of 4 image(s) could not be segmented:"
    summary = captured.err[captured.err.index("error: ") :]
    assert f"cannot read image {bad}" in summary and f"{folder}: is a directory" in summary


def test_the_real_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.pt")
    args = [CLIPZSS, "segment", "x.png", "--checkpoint", missing, "--classes", "cat"]
    env = {k: v for k, v in os.environ.items() if k != "CLIPZSS_DEBUG"}
    plain = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 1 and missing in _error_line(plain.stderr)
    assert len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and missing in debug.stderr
    by_env = subprocess.run(args, capture_output=True, text=True, env={**env, "CLIPZSS_DEBUG": "1"}, timeout=300)
    assert by_env.returncode == 1 and "Traceback (most recent call last)" in by_env.stderr


def test_train_py_itself_reports_one_line(tmp_path):
    script = Path(__file__).resolve().parents[1] / "clipzss" / "train.py"
    env = {k: v for k, v in os.environ.items() if k != "CLIPZSS_DEBUG"}
    done = subprocess.run([sys.executable, str(script), "optim.lr=nan", f"run.output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "optim.lr: must be a finite number, got nan" in done.stderr
    _error_line(done.stderr)
    debug = subprocess.run([sys.executable, str(script), "optim.lr=nan", "--debug"], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_resume_into_a_store_without_the_run_names_the_store_and_the_way_on(assets, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(assets, out, **{"optim.max_iters": 2})
    assert cli(["train", *overrides]) == 0
    (tmp_path / "other").mkdir()
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    capsys.readouterr()
    assert cli(["train", *overrides, "optim.max_iters=4", f"tracking.uri={other}", "--resume"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert other in line and "tracking.uri" in line and str(out / "mlflow_run_id") in line, line
