"""Download the official archives and convert them to the mmsegmentation layouts (``clipzss prepare DATASET``).

The conversions follow mmsegmentation's ``tools/dataset_converters`` (voc_aug.py, coco_stuff164k.py,
pascal_context.py); ADE20K ships in its layout already. Downloads resume (``<archive>.part``) and an archive already
present is kept only if it matches its published checksum; with ``download=False`` the archives must already be in
``root`` and are converted as they are (a repack or a mirror of your own).
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


@dataclass(frozen=True)
class Archive:
    """An official archive: its file name in ``root``, where it is published (https), and its published checksum
    (``"md5:<hex>"`` or ``"sha1:<hex>"``; ``""`` where the publisher gives none)."""

    filename: str
    url: str
    checksum: str = ""


# Checksums as published with the datasets and repeated by torchvision (VOC, SBD, Context JSON), the COCO download
# scripts (COCO) and GluonCV (ADE20K). COCO-Stuff publishes none for its label maps.
VOC2012 = Archive(
    "VOCtrainval_11-May-2012.tar",
    "https://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "md5:6cd6e144f989b92b3379bac3b3de84fd",
)
SBD = Archive(
    "benchmark.tgz",
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    "md5:82b4d87ceb2ed10f6038a1cba92111cb",
)
VOC2010 = Archive(
    "VOCtrainval_03-May-2010.tar",
    "https://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
    "md5:da459979d0c395079b5c75ee67908abb",
)
CONTEXT_JSON = Archive(
    "trainval_merged.json",
    "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
    "md5:3c2d0c0656b7be9eb61928ffe885d8ce",
)
COCO_TRAIN = Archive(
    "train2017.zip", "https://images.cocodataset.org/zips/train2017.zip", "md5:cced6f7f71b7629ddf16f17bbcfab6b2"
)
COCO_VAL = Archive(
    "val2017.zip", "https://images.cocodataset.org/zips/val2017.zip", "md5:442b8da7639aecaf257c1dceb8ba8c80"
)
COCO_STUFF_MAPS = Archive(
    "stuffthingmaps_trainval2017.zip",
    "https://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
)
ADE20K = Archive(
    "ADEChallengeData2016.zip",
    "https://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
)

DETAIL_HELP = (
    "PASCAL Context conversion needs the Detail API ('detail' package), which is not on PyPI: install it with\n"
    "  pip install 'git+https://github.com/zhanghang1989/detail-api.git#subdirectory=PythonAPI'\n"
    "(or clone that repository and run 'python setup.py install' in PythonAPI/), then rerun clipzss prepare."
)

# COCO-Stuff stuffthingmaps ids 0..181 with these 11 unused COCO thing ids removed become labelTrainIds 0..170.
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
# Detail-API category ids of background + the 59 PASCAL Context classes; sorted position = label id (mmseg _mapping).
CONTEXT_IDS = np.sort(
    np.array(
        [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295]
        + [296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85]
        + [347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]
    )
)


def check_url(url: str) -> None:
    """Only https travels the internet; plain http is accepted on the loopback interface alone (a local mirror)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost")):
        raise ValueError(f"refusing to download {url}: only https URLs are fetched (http only from 127.0.0.1)")


def file_digest(path: Path, checksum: str) -> str:
    """``"<algorithm>:<hex>"`` of ``path`` by the algorithm ``checksum`` names (md5, sha1, sha256); shows progress."""
    algorithm = checksum.partition(":")[0]
    if algorithm not in ("md5", "sha1", "sha256"):
        raise ValueError(f"unknown checksum algorithm in {checksum!r} (md5, sha1 or sha256)")
    digest = hashlib.new(algorithm)
    with (
        open(path, "rb") as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"check {path.name}") as bar,
    ):
        while block := f.read(1 << 24):
            digest.update(block)
            bar.update(len(block))
    return f"{algorithm}:{digest.hexdigest()}"


def download_file(url: str, dest: Path, checksum: str = "", chunk_size: int = 1 << 20) -> Path:
    """Fetch ``url`` to ``dest`` with a progress bar, resuming ``dest.part``, and check it against ``checksum``.

    A ``dest`` already there is kept only if it matches ``checksum`` (or, with no published checksum, the server's
    size); otherwise it is fetched again. A finished download that does not match is deleted.

    Raises:
        ValueError: ``url`` is not https.
        OSError: the transfer ended short (rerun to resume), the server cannot be reached, or the download does not
            match its published checksum.
    """
    check_url(url)
    if dest.is_file() and checksum:
        if file_digest(dest, checksum) == checksum:
            return dest
        print(f"{dest} does not match its published checksum {checksum}: fetching it again")
        dest.unlink()
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        length = response.headers.get("Content-Length")
    expected = int(length) if length is not None else None
    if dest.is_file():
        if expected is None or dest.stat().st_size == expected:
            return dest
        dest.unlink()  # a different size: not the published archive
    part = _fetch_part(url, dest, expected, chunk_size)
    if checksum and (found := file_digest(part, checksum)) != checksum:
        part.unlink()
        raise OSError(f"download of {url} has {found}, but {checksum} is published: deleted; rerun to fetch it again")
    part.rename(dest)
    return dest


def _fetch_part(url: str, dest: Path, expected: int | None, chunk_size: int) -> Path:
    """Download into ``dest.part``, continuing what an earlier attempt left there; returns the complete part file."""
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    if expected is not None and start > expected:
        part.unlink()
        start = 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        if start and response.status != 206:  # the server ignored the range: start over
            start = 0
        with (
            open(part, "ab" if start else "wb") as out,
            tqdm(total=expected, initial=start, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            while block := response.read(chunk_size):
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise OSError(f"download of {url} stopped at {size} of {expected} bytes; rerun to resume ({part})")
    return part


def fetch_archives(archives: tuple[Archive, ...], root: Path, download: bool) -> dict[str, Path]:
    """Paths of ``archives`` in ``root``, downloading them when ``download``.

    Raises:
        FileNotFoundError: with ``download=False``, naming every missing archive and its URL.
    """
    paths = {a.filename: root / a.filename for a in archives}
    if download:
        for archive in archives:
            download_file(archive.url, paths[archive.filename], archive.checksum)
        return paths
    missing = [f"  {paths[a.filename]} (download it from {a.url})" for a in archives if not paths[a.filename].is_file()]
    if missing:
        raise FileNotFoundError("missing archive(s); rerun with download enabled or fetch them:\n" + "\n".join(missing))
    return paths


def extract(archive: Path, dest: Path) -> None:
    """Unpack a .tar/.tgz/.zip into ``dest`` once (a marker file records a finished extraction)."""
    marker = dest / f".{archive.name}.extracted"
    if marker.is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for member in tqdm(z.infolist(), desc=f"extract {archive.name}", unit="file"):
                z.extract(member, dest)
    else:
        with tarfile.open(archive) as t:
            for member in tqdm(t, desc=f"extract {archive.name}", unit="file"):
                t.extract(member, dest, filter="data")
    marker.touch()


def convert_sbd(cls_dir: Path, out_dir: Path) -> int:
    """SBD ``cls/*.mat`` (``GTcls.Segmentation``, VOC ids 0..20) -> ``out_dir/<name>.png``; returns the count."""
    from scipy.io import loadmat  # scipy comes with scikit-learn; only this converter needs it

    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(cls_dir.glob("*.mat"))
    for path in tqdm(files, desc="SBD .mat -> png", unit="file"):
        mask = loadmat(str(path))["GTcls"][0]["Segmentation"][0].astype(np.uint8)
        Image.fromarray(mask).save(out_dir / f"{path.stem}.png")
    return len(files)


def palette_to_index(src_dir: Path, out_dir: Path) -> int:
    """Copy VOC ``SegmentationClass`` palette PNGs to ``out_dir`` as single-channel index PNGs; returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(src_dir.glob("*.png"))
    for path in tqdm(files, desc="VOC labels -> index png", unit="file"):
        with Image.open(path) as f:
            Image.fromarray(np.array(f, dtype=np.uint8)).save(out_dir / path.name)
    return len(files)


def write_aug_list(voc_root: Path, sbd_dir: Path) -> list[str]:
    """``ImageSets/Segmentation/aug.txt`` = (VOC train + SBD train + SBD val) - VOC val, sorted (10,582 names)."""
    sets = voc_root / "ImageSets" / "Segmentation"

    def read(path: Path) -> set[str]:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}

    merged = read(sets / "train.txt") | read(sbd_dir / "train.txt") | read(sbd_dir / "val.txt")
    names = sorted(merged - read(sets / "val.txt"))
    (sets / "aug.txt").write_text("".join(f"{n}\n" for n in names))
    return names


def coco_stuff_lut() -> np.ndarray:
    """[256] uint8 table: stuffthingmaps id (0..181) -> labelTrainId (0..170); unused and unlabelled ids -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    used = [i for i in range(182) if i not in COCO_UNUSED_IDS]
    lut[used] = np.arange(len(used), dtype=np.uint8)
    return lut


def convert_coco_stuff(ann_dir: Path) -> int:
    """Each stuffthingmaps ``<name>.png`` in ``ann_dir`` -> ``<name>_labelTrainIds.png`` beside it; returns a count."""
    lut = coco_stuff_lut()
    files = sorted(p for p in ann_dir.glob("*.png") if not p.name.endswith("_labelTrainIds.png"))
    for path in tqdm(files, desc=f"COCO-Stuff {ann_dir.name} -> labelTrainIds", unit="file"):
        with Image.open(path) as f:
            ids = np.array(f, dtype=np.uint8)
        Image.fromarray(lut[ids]).save(ann_dir / f"{path.stem}_labelTrainIds.png")
    return len(files)


def context_labels(mask: np.ndarray, where: str = "mask") -> np.ndarray:
    """Detail-API category ids -> PASCAL Context label ids 0..59 (0 = background), mmseg's mapping.

    Raises:
        ValueError: a category id outside the 60 (naming ``where`` and the ids).
    """
    unknown = np.setdiff1d(np.unique(mask), CONTEXT_IDS)
    if unknown.size:
        raise ValueError(f"{where}: category id(s) {unknown.tolist()} are not among the 60 PASCAL Context classes")
    return np.digitize(mask, CONTEXT_IDS, right=True).astype(np.uint8)


def write_context(detail_factory: Callable[[str], object], voc2010: Path) -> dict[str, list[str]]:
    """Write ``SegmentationClassContext/*.png`` and ``ImageSets/SegmentationContext/{train,val}.txt``.

    Args:
        detail_factory: phase ("train"/"val") -> a Detail-API object (``getImgs()``, ``getMask(img)``).
    """
    out_dir, sets = voc2010 / "SegmentationClassContext", voc2010 / "ImageSets" / "SegmentationContext"
    out_dir.mkdir(parents=True, exist_ok=True)
    sets.mkdir(parents=True, exist_ok=True)
    written = {}
    for phase in ("train", "val"):
        detail = detail_factory(phase)
        names = []
        for img in tqdm(detail.getImgs(), desc=f"PASCAL Context {phase}", unit="image"):  # type: ignore[attr-defined]
            name = Path(img["file_name"]).stem
            labels = context_labels(np.asarray(detail.getMask(img)), where=img["file_name"])  # type: ignore[attr-defined]
            Image.fromarray(labels).save(out_dir / f"{name}.png")
            names.append(name)
        (sets / f"{phase}.txt").write_text("".join(f"{n}\n" for n in sorted(names)))
        written[phase] = sorted(names)
    return written


def _prepare_voc(root: Path, archives: dict[str, Path]) -> Path:
    extract(archives[VOC2012.filename], root)
    extract(archives[SBD.filename], root)
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    convert_sbd(sbd / "cls", voc / "SegmentationClassAug")
    palette_to_index(voc / "SegmentationClass", voc / "SegmentationClassAug")  # VOC's own labels win over SBD's
    write_aug_list(voc, sbd)
    return voc


def _prepare_coco_stuff(root: Path, archives: dict[str, Path]) -> Path:
    base = root / "coco_stuff164k"
    extract(archives[COCO_TRAIN.filename], base / "images")
    extract(archives[COCO_VAL.filename], base / "images")
    extract(archives[COCO_STUFF_MAPS.filename], base / "annotations")
    for split in ("train2017", "val2017"):
        convert_coco_stuff(base / "annotations" / split)
    return base


def detail_api() -> type:
    """The Detail API's ``Detail`` class; raises RuntimeError explaining how to install it when missing."""
    try:
        from detail import Detail
    except ImportError as e:
        raise RuntimeError(DETAIL_HELP) from e
    return Detail


def _prepare_context(root: Path, archives: dict[str, Path]) -> Path:
    detail = detail_api()
    extract(archives[VOC2010.filename], root)
    voc2010 = root / "VOCdevkit" / "VOC2010"
    json_path, img_dir = str(archives[CONTEXT_JSON.filename]), str(voc2010 / "JPEGImages")
    write_context(lambda phase: detail(json_path, img_dir, phase), voc2010)
    return voc2010


def _prepare_ade20k(root: Path, archives: dict[str, Path]) -> Path:
    extract(archives[ADE20K.filename], root)
    return root / "ADEChallengeData2016"


@dataclass(frozen=True)
class Preparer:
    """What one dataset needs: its archives, a check of required software run before any download, a converter."""

    archives: tuple[Archive, ...]
    convert: Callable[[Path, dict[str, Path]], Path]
    requires: Callable[[], object] | None = None


_CONTEXT = Preparer((VOC2010, CONTEXT_JSON), _prepare_context, requires=detail_api)
# context, context59 and context60 are one conversion (the 59/60 difference is reduce_zero_label at load time).
PREPARERS: dict[str, Preparer] = {
    "voc": Preparer((VOC2012, SBD), _prepare_voc),
    "coco_stuff": Preparer((COCO_TRAIN, COCO_VAL, COCO_STUFF_MAPS), _prepare_coco_stuff),
    "context": _CONTEXT,
    "context59": _CONTEXT,
    "context60": _CONTEXT,
    "ade20k": Preparer((ADE20K,), _prepare_ade20k),
}


def prepare(dataset: str, root: str | Path, download: bool = True) -> Path:
    """Download (optionally) and convert ``dataset`` under ``root``; returns the dataset root for ``data.root``.

    Raises:
        ValueError: unknown dataset (listing the allowed ones).
        FileNotFoundError: ``download=False`` and archives are missing (naming each and its URL).
        RuntimeError: PASCAL Context without the Detail API (explaining how to install it).
    """
    if dataset not in PREPARERS:
        raise ValueError(f"clipzss prepare: unknown dataset {dataset!r}; allowed: {', '.join(PREPARERS)}")
    preparer = PREPARERS[dataset]
    if preparer.requires is not None:
        preparer.requires()
    base = Path(root).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return preparer.convert(base, fetch_archives(preparer.archives, base, download))
