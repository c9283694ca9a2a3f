"""Dataset preparation on tiny raw-format archives (no network): conversions, layouts, resumable downloads."""

import hashlib
import http.server
import io
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from clipzss.config import DataConfig
from clipzss.data import prepare as prep
from clipzss.data.datasets import build_dataset
from clipzss.data.validate import validate_dataset

SIZE = (24, 32)  # H, W


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, "PNG")
    return buffer.getvalue()


def sbd_mat_bytes(mask: np.ndarray, tmp_path) -> bytes:
    path = tmp_path / "tmp.mat"
    savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros(1), "CategoriesPresent": np.unique(mask)}})
    return path.read_bytes()


def write_tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz" if path.suffix == ".tgz" else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_zip(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def voc_mask(value: int) -> np.ndarray:
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[4:12, 4:20] = value
    mask[3, :] = 255
    return mask


def test_convert_sbd_reads_gtcls_segmentation(tmp_path):
    mask = voc_mask(7)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "2008_000002.mat").write_bytes(sbd_mat_bytes(mask, tmp_path))
    assert prep.convert_sbd(tmp_path / "cls", tmp_path / "out") == 1
    out = Image.open(tmp_path / "out" / "2008_000002.png")
    assert out.mode == "L" and np.array_equal(np.array(out), mask)


def test_prepare_voc_from_archives_builds_a_loadable_dataset(tmp_path):
    voc = "VOCdevkit/VOC2012/"
    names = {"train": ["a1", "a2"], "val": ["v1", "v2"]}
    files = {f"{voc}JPEGImages/{n}.jpg": jpeg_bytes(i) for i, n in enumerate(["a1", "a2", "v1", "v2", "s1", "s2"])}
    files |= {f"{voc}SegmentationClass/{n}.png": png_bytes(voc_mask(3), "P") for n in ["a1", "a2", "v1", "v2"]}
    files |= {f"{voc}ImageSets/Segmentation/{m}.txt": "\n".join(v).encode() + b"\n" for m, v in names.items()}
    write_tar(tmp_path / prep.VOC2012.filename, files)
    sbd = "benchmark_RELEASE/dataset/"
    sbd_files = {f"{sbd}cls/{n}.mat": sbd_mat_bytes(voc_mask(9), tmp_path) for n in ["a1", "s1", "s2", "v1"]}
    sbd_files |= {f"{sbd}train.txt": b"a1\ns1\nv1\n", f"{sbd}val.txt": b"s2\n"}
    write_tar(tmp_path / prep.SBD.filename, sbd_files)

    root = prep.prepare("voc", tmp_path, download=False)
    assert root == tmp_path / "VOCdevkit" / "VOC2012"
    assert (root / "ImageSets/Segmentation/aug.txt").read_text().split() == ["a1", "a2", "s1", "s2"]
    aug = root / "SegmentationClassAug"
    assert np.array_equal(np.array(Image.open(aug / "s1.png")), voc_mask(9))
    assert np.array_equal(np.array(Image.open(aug / "a1.png")), voc_mask(3))  # VOC's own label wins over SBD's
    assert Image.open(aug / "a2.png").mode == "L"
    assert validate_dataset("voc", root, progress=False) == []
    train = build_dataset(DataConfig(root=str(root), crop_size=16, scale=(64, 24)), "train")
    assert len(train) == 4 and train[0]["label"].shape == (16, 16)


def test_coco_stuff_lut_matches_mmseg_mapping():
    lut = prep.coco_stuff_lut()
    mmseg = {0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 43: 39, 45: 40, 64: 59, 66: 60, 69: 61}
    mmseg |= {71: 62, 81: 72, 83: 73, 89: 79, 91: 80, 181: 170, 255: 255}
    assert {k: int(lut[k]) for k in mmseg} == mmseg
    assert all(lut[k] == 255 for k in prep.COCO_UNUSED_IDS)
    assert sorted(set(lut[:182].tolist()) - {255}) == list(range(171))


def test_prepare_coco_stuff_and_ade20k_from_archives(tmp_path):
    stuff = np.array([[0, 11, 12, 26], [66, 69, 91, 181], [255, 255, 5, 5]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    size = stuff.shape
    write_zip(
        tmp_path / prep.COCO_STUFF_MAPS.filename,
        {f"{s}/000000000001.png": png_bytes(stuff) for s in ("train2017", "val2017")},
    )
    for s in ("train2017", "val2017"):
        write_zip(tmp_path / f"{s}.zip", {f"{s}/000000000001.jpg": _jpeg_of(size)})
    root = prep.prepare("coco_stuff", tmp_path, download=False)
    converted = np.array(Image.open(root / "annotations/val2017/000000000001_labelTrainIds.png"))
    expected = np.array([[0, 255, 11, 24], [60, 61, 80, 170], [255, 255, 5, 5]]).repeat(8, 0).repeat(8, 1)
    assert np.array_equal(converted, expected)
    assert validate_dataset("coco_stuff", root, progress=False) == []

    ade = {"ADEChallengeData2016/images/training/ADE_train_1.jpg": _jpeg_of(size)}
    ade |= {"ADEChallengeData2016/images/validation/ADE_val_1.jpg": _jpeg_of(size)}
    ade |= {
        f"ADEChallengeData2016/annotations/{m}/ADE_{s}_1.png": png_bytes(stuff % 151)
        for m, s in [("training", "train"), ("validation", "val")]
    }
    write_zip(tmp_path / prep.ADE20K.filename, ade)
    ade_root = prep.prepare("ade20k", tmp_path, download=False)
    assert ade_root == tmp_path / "ADEChallengeData2016" and validate_dataset("ade20k", ade_root, progress=False) == []


def _jpeg_of(size):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 128, dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_context_labels_follow_mmseg_mapping():
    mask = np.array([[0, 2, 9], [115, 458, 0]])
    assert prep.context_labels(mask).tolist() == [[0, 1, 2], [24, 59, 0]]
    with pytest.raises(ValueError, match=r"2008_000123.jpg: category id\(s\) \[1, 500\]"):
        prep.context_labels(np.array([1, 2, 500]), where="2008_000123.jpg")


class FakeDetail:
    """The two Detail-API calls the converter uses."""

    def __init__(self, phase):
        self.images = [{"file_name": f"2008_{phase}_{i}.jpg"} for i in range(2)]

    def getImgs(self):
        return self.images

    def getMask(self, img):
        mask = np.zeros(SIZE, dtype=np.int64)
        mask[:, 10:] = 458  # wood, the last class
        mask[:5, :5] = 2  # aeroplane
        return mask


def test_write_context_produces_a_loadable_layout(tmp_path):
    voc2010 = tmp_path / "VOCdevkit" / "VOC2010"
    written = prep.write_context(FakeDetail, voc2010)
    assert written["val"] == ["2008_val_0", "2008_val_1"]
    assert (voc2010 / "ImageSets/SegmentationContext/train.txt").read_text().split() == written["train"]
    for name in written["train"] + written["val"]:
        (voc2010 / "JPEGImages").mkdir(exist_ok=True)
        (voc2010 / "JPEGImages" / f"{name}.jpg").write_bytes(jpeg_bytes(0))
    cfg = DataConfig(root=str(voc2010), test_short_side=24)
    c59 = build_dataset(cfg, "val", dataset="context59")[0]["label"]
    c60 = build_dataset(cfg, "val", dataset="context60")[0]["label"]
    assert c59[0, 0] == 0 and c59[0, 20] == 58 and c59[10, 0] == 255  # aeroplane, wood, background
    assert c60[0, 0] == 1 and c60[0, 20] == 59 and c60[10, 0] == 0


def test_context_without_detail_api_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detail", None)  # makes 'import detail' fail
    with pytest.raises(RuntimeError, match="detail-api"):
        prep.prepare("context59", tmp_path, download=False)


def test_missing_archives_name_the_file_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        prep.prepare("voc", tmp_path, download=False)
    text = str(error.value)
    assert str(tmp_path / prep.VOC2012.filename) in text and prep.VOC2012.url in text and prep.SBD.url in text
    with pytest.raises(ValueError, match="allowed: voc, coco_stuff"):
        prep.prepare("cityscapes", tmp_path)


PAYLOAD = bytes(range(256)) * 40


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD, honouring 'Range: bytes=N-' like the dataset hosts do; counts GET requests."""

    gets: list[str] = []

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[len("bytes=") :].rstrip("-"))
        RangeHandler.gets.append(self.headers.get("Range", ""))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file_and_skips_a_complete_one(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/archive.tar"
        dest = tmp_path / "archive.tar"
        (tmp_path / "archive.tar.part").write_bytes(PAYLOAD[:1000])
        prep.download_file(url, dest)
        assert dest.read_bytes() == PAYLOAD and RangeHandler.gets == ["bytes=1000-"]
        assert not (tmp_path / "archive.tar.part").exists()
        prep.download_file(url, dest)  # present with the server's size: no GET
        assert RangeHandler.gets == ["bytes=1000-"]
        dest.write_bytes(b"short")  # wrong size: fetched again
        prep.download_file(url, dest)
        assert dest.read_bytes() == PAYLOAD and RangeHandler.gets == ["bytes=1000-", ""]
    finally:
        server.shutdown()
        server.server_close()


def serve(handler):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_file_of_the_right_size_but_wrong_hash_is_fetched_again(tmp_path):
    published = "md5:" + hashlib.md5(PAYLOAD).hexdigest()
    server = serve(RangeHandler)
    try:
        url = f"http://127.0.0.1:{server.server_port}/archive.tar"
        dest = tmp_path / "archive.tar"
        dest.write_bytes(bytes(len(PAYLOAD)))  # the server's size, other bytes
        RangeHandler.gets.clear()
        prep.download_file(url, dest, published)
        assert dest.read_bytes() == PAYLOAD and RangeHandler.gets == [""]
        prep.download_file(url, dest, published)  # matches: no GET
        assert RangeHandler.gets == [""]
        (tmp_path / "archive.tar.part").write_bytes(b"\xff" * 100)  # a corrupt partial file, resumed then checked
        dest.unlink()
        with pytest.raises(OSError, match=r"archive\.tar has md5:.*but md5:.* is published: deleted"):
            prep.download_file(url, dest, published)
        assert not dest.exists() and not (tmp_path / "archive.tar.part").exists()
        prep.download_file(url, dest, published)  # the rerun starts clean
        assert dest.read_bytes() == PAYLOAD
    finally:
        server.shutdown()
        server.server_close()


def test_every_archive_is_https_with_a_published_checksum():
    archives = {a for p in prep.PREPARERS.values() for a in p.archives}
    assert all(a.url.startswith("https://") for a in archives)
    assert {a.filename for a in archives if not a.checksum} == {"stuffthingmaps_trainval2017.zip"}  # none published
    with pytest.raises(ValueError, match="only https URLs"):
        prep.download_file("http://example.org/x.tar", Path("x.tar"))
