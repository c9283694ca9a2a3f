"""Zero-shot splits as versioned data: ``clipzss/data/splits/<dataset>.yaml`` names every class and each split's
unseen classes by name (never by index), so a split can be read, reviewed and tested by name.

Each file holds ``dataset``, ``version``, ``classes`` (in label-id order of the converted annotations),
``default_split`` and ``splits: {name: {unseen: [...]}}``; every dataset has the split ``all`` (no unseen class).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

SPLIT_DIR = Path(__file__).parent / "splits"


class SplitError(ValueError):
    """A split file is malformed, or a dataset or split name is unknown; the message names the file or the name."""


@dataclass(frozen=True)
class ZeroShotSplit:
    """The classes of one dataset divided into seen (annotated in training) and unseen (test only).

    Attributes:
        dataset: dataset name (the split file's stem).
        name: split name inside that file (``"default"`` already resolved).
        classes: every class name, in label-id order.
        unseen: the unseen class names, in the file's order.
    """

    dataset: str
    name: str
    classes: tuple[str, ...]
    unseen: tuple[str, ...]

    @property
    def seen(self) -> tuple[str, ...]:
        """Seen class names, in label-id order (index = id in the seen label space 0..Ns-1)."""
        unseen = set(self.unseen)
        return tuple(c for c in self.classes if c not in unseen)

    @property
    def seen_ids(self) -> list[int]:
        """Ids into ``classes`` of the seen classes, ascending."""
        unseen = set(self.unseen)
        return [i for i, c in enumerate(self.classes) if c not in unseen]

    @property
    def unseen_ids(self) -> list[int]:
        """Ids into ``classes`` of the unseen classes, ascending."""
        unseen = set(self.unseen)
        return [i for i, c in enumerate(self.classes) if c in unseen]


def available_datasets() -> list[str]:
    """Names of the datasets that have a split file, sorted."""
    return sorted(_split_files())


def load_split(dataset: str, name: str = "default") -> ZeroShotSplit:
    """Read split ``name`` of ``dataset``; ``"default"`` resolves to the file's ``default_split``.

    Raises:
        SplitError: unknown dataset or split (the message lists the allowed names), or a malformed file.
    """
    files = _split_files()
    if dataset not in files:
        raise SplitError(f"no split file for dataset {dataset!r} in {SPLIT_DIR}; available: {', '.join(sorted(files))}")
    return _parse(files[dataset], name)


def _split_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPLIT_DIR.glob("*.yaml"))}


@cache
def _read(path: Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected a mapping with keys dataset, version, classes, default_split, splits")
    missing = [k for k in ("dataset", "version", "classes", "default_split", "splits") if k not in data]
    if missing:
        raise SplitError(f"{path}: missing key(s) {', '.join(missing)}")
    if data["dataset"] != path.stem:
        raise SplitError(f"{path}: dataset is {data['dataset']!r}, but the file name says {path.stem!r}")
    classes = data["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise SplitError(f"{path}: classes must be a non-empty list of names")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise SplitError(f"{path}: duplicate class name(s) {', '.join(duplicates)}")
    return data


def _parse(path: Path, name: str) -> ZeroShotSplit:
    data = _read(path)
    splits = data["splits"]
    resolved = data["default_split"] if name == "default" and "default" not in splits else name
    if resolved not in splits:
        allowed = ", ".join(["default", *(s for s in splits if s != "default")])
        raise SplitError(f"{path}: no split {name!r}; available: {allowed}")
    entry = splits[resolved] or {}
    unseen = entry.get("unseen", [])
    unknown = [u for u in unseen if u not in data["classes"]]
    if unknown:
        raise SplitError(f"{path}: split {resolved!r} names unseen class(es) not in classes: {', '.join(unknown)}")
    return ZeroShotSplit(dataset=data["dataset"], name=resolved, classes=tuple(data["classes"]), unseen=tuple(unseen))
