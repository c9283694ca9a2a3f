"""Zero-shot splits: the protocol's class names, resolved by name, with clear errors."""

import pytest
import yaml

from clipzss.data import splits
from clipzss.data.splits import SplitError, available_datasets, load_split

REAL = ["voc", "coco_stuff", "context59", "context60", "ade20k"]


def test_every_split_file_is_well_formed_and_names_only_known_classes():
    for path in sorted(splits.SPLIT_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data["dataset"] == path.stem
        assert "all" in data["splits"] and data["default_split"] in data["splits"]
        for name, entry in data["splits"].items():
            unknown = set(entry["unseen"]) - set(data["classes"])
            assert not unknown, f"{path.name}:{name} names unknown classes {unknown}"
            split = load_split(path.stem, name)
            assert set(split.seen) | set(split.unseen) == set(split.classes)
            assert [split.classes[i] for i in split.unseen_ids] == [c for c in split.classes if c in split.unseen]
            assert [split.classes[i] for i in split.seen_ids] == list(split.seen)


def test_available_datasets_lists_every_file():
    assert set(REAL) <= set(available_datasets())


def test_voc_default_split():
    split = load_split("voc")
    assert split.name == "default" and len(split.classes) == 20 and split.classes[0] == "aeroplane"
    assert split.classes[-1] == "tvmonitor" and "background" not in split.classes
    assert split.unseen == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
    assert split.unseen_ids == [15, 16, 17, 18, 19]
    assert len(split.seen) == 15 and split.seen_ids == list(range(15))


def test_coco_stuff_split():
    split = load_split("coco_stuff")
    assert len(split.classes) == 171
    assert split.classes[:3] == ("person", "bicycle", "car") and split.classes[-1] == "wood"
    expected = {"cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds"}
    expected |= {"grass", "playingfield", "river", "road", "tree", "wall-concrete"}
    assert set(split.unseen) == expected and len(split.unseen) == 15
    assert split.classes.index("wall-concrete") == 160 and split.classes.index("cow") == 19


def test_context_splits():
    zs3 = load_split("context59")
    assert zs3.name == "zs3" and len(zs3.classes) == 59 and "background" not in zs3.classes
    assert set(zs3.unseen) == {
        "cow",
        "motorbike",
        "sofa",
        "cat",
        "boat",
        "fence",
        "bird",
        "tvmonitor",
        "keyboard",
        "aeroplane",
    }
    cascade = load_split("context59", "cascade")
    assert set(cascade.unseen) == {
        "aeroplane",
        "bed",
        "bedclothes",
        "boat",
        "bottle",
        "car",
        "cloth",
        "cow",
        "keyboard",
        "plate",
    }
    sixty = load_split("context60")
    assert sixty.classes[0] == "background" and sixty.classes[1:] == zs3.classes and sixty.unseen == ()


def test_ade20k_is_open_vocabulary_only():
    split = load_split("ade20k")
    assert split.name == "all" and len(split.classes) == 150 and split.unseen == ()
    assert split.classes[:3] == ("wall", "building", "sky") and split.classes[-1] == "flag"
    assert split.seen_ids == list(range(150))


@pytest.mark.parametrize("dataset", REAL)
def test_all_split_has_no_unseen(dataset):
    split = load_split(dataset, "all")
    assert split.unseen == () and split.seen == split.classes


def test_unknown_dataset_and_split_errors_list_the_choices():
    with pytest.raises(SplitError, match="available: .*coco_stuff.*voc"):
        load_split("pascal")
    with pytest.raises(SplitError, match=r"voc.yaml: no split 'zs3'; available: default, all"):
        load_split("voc", "zs3")


def test_a_new_split_file_just_works_and_bad_names_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(splits, "SPLIT_DIR", tmp_path)
    (tmp_path / "toy.yaml").write_text(
        "dataset: toy\nversion: 1\nclasses: [a, b, c]\ndefault_split: s\n"
        "splits:\n  s: {unseen: [b]}\n  bad: {unseen: [zebra]}\n  all: {unseen: []}\n"
    )
    assert available_datasets() == ["toy"]
    toy = load_split("toy")
    assert toy.name == "s" and toy.seen == ("a", "c") and toy.unseen_ids == [1] and toy.seen_ids == [0, 2]
    with pytest.raises(SplitError, match="toy.yaml: split 'bad' names unseen class.*zebra"):
        load_split("toy", "bad")
