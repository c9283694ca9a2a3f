"""Scan a dataset on disk and report every problem at once (``clipzss validate DATASET --root DIR``).

Uses the very checks :class:`clipzss.data.datasets.SegmentationDataset` makes, so a dataset that validates
cleanly loads without a :class:`~clipzss.data.datasets.DatasetError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from clipzss.data.datasets import DatasetError, Problem, check_root, layout_of, list_samples, read_sample
from clipzss.data.splits import load_split


def validate_dataset(
    dataset: str, root: str | Path, split_name: str = "default", progress: bool = True
) -> list[Problem]:
    """Every problem of both modes (train and val) of ``dataset`` at ``root``: missing root, split files, files,
    empty splits, corrupt or truncated images, label values outside the classes, image/label size mismatches.

    Args:
        split_name: the zero-shot split whose class list bounds the label values.
        progress: show a tqdm bar per mode.
    """
    layout, classes = layout_of(dataset), load_split(dataset, split_name).classes
    problems = check_root(dataset, root)
    if problems:
        return problems
    for mode in ("train", "val"):
        try:
            samples, missing = list_samples(dataset, root, mode)
        except DatasetError as e:
            problems += e.problems
            continue
        problems += missing
        for sample in tqdm(samples, desc=f"{dataset} {mode}", disable=not progress, leave=False):
            problems += read_sample(sample, len(classes), layout.reduce_zero_label)[2]
    return problems


def format_problems(problems: Sequence[Problem]) -> str:
    """One line per problem (``path: message``) and a count; a single line saying all is well if there are none."""
    if not problems:
        return "no problems found"
    lines = [str(p) for p in problems]
    return "\n".join([*lines, f"{len(lines)} problem(s) found"])
