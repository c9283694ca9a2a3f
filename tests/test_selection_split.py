"""The synthetic world's selection split: disjoint from train and val, deterministic, and what ``ablate --select``
evaluates on."""

import hashlib
import json

import numpy as np
import yaml
from PIL import Image

import clipzss.data.synthetic as synthetic
from clipzss.cli import main as cli
from clipzss.config import load_config
from clipzss.data.datasets import build_dataset
from clipzss.data.synthetic import materialize_world, render_scene, scene_rng, selection_root


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_selection_scenes_are_disjoint_from_train_and_val_and_deterministic(tmp_path):
    root = materialize_world(tmp_path / "a", seed=2, n_train=40, n_val=12, size=32, progress=False, n_select=12)
    chosen = selection_root(root)
    select = _digests(chosen / "annotations" / "val")
    assert list(select) == [f"select_{i:06d}.png" for i in range(12)]
    images = _digests(chosen / "images" / "val")
    others = set(_digests(root / "images" / "train").values()) | set(_digests(root / "images" / "val").values())
    assert not set(images.values()) & others  # no selection image is a train or val image
    label = np.asarray(Image.open(chosen / "annotations" / "val" / "select_000003.png"))
    assert np.array_equal(label, render_scene(scene_rng(2, "select", 3), 32).label)

    again = materialize_world(tmp_path / "b", seed=2, n_train=40, n_val=12, size=32, progress=False, n_select=12)
    assert _digests(selection_root(again) / "images" / "val") == images  # the same world on any machine

    cfg = load_config("synthetic", ["data.eval_dataset=synthetic", f"data.eval_root={chosen}"])
    held_out = build_dataset(cfg.data, "val", root=cfg.data.eval_root)
    assert len(held_out) == 12 and held_out.unseen_ids  # read as a zero-shot val split, unseen classes scored


def test_a_world_made_without_a_selection_split_keeps_its_train_and_val_scenes(tmp_path, monkeypatch):
    root = materialize_world(tmp_path / "w", seed=1, n_train=5, n_val=3, size=32, progress=False, n_select=4)
    marker = (root / "world.json").read_text()
    before = _digests(root / "images" / "train") | _digests(root / "images" / "val")
    assert "select" not in json.loads(marker)  # train / val parameters only: worlds made earlier still match
    for sub in ("images", "annotations"):  # a world from before the selection split existed
        for p in (selection_root(root) / sub / "val").iterdir():
            p.unlink()
    (selection_root(root) / "world.json").unlink()

    streams = []
    monkeypatch.setattr(
        synthetic, "scene_rng", lambda seed, stream, i: streams.append(stream) or scene_rng(seed, stream, i)
    )
    materialize_world(root, seed=1, n_train=5, n_val=3, size=32, progress=False, n_select=4)
    assert streams == ["select"] * 4  # only the selection scenes were rendered
    assert (root / "world.json").read_text() == marker
    assert _digests(root / "images" / "train") | _digests(root / "images" / "val") == before
    streams.clear()
    materialize_world(root, seed=1, n_train=5, n_val=3, size=32, progress=False, n_select=4)
    assert streams == []  # both parts present: nothing rendered


def test_ablate_select_evaluates_every_run_on_the_selection_split_and_says_so(tmp_path, capsys):
    world = tmp_path / "world"
    overrides = [f"data.root={world}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    overrides += [f"teacher.cache_dir={tmp_path / 'text'}", "data.batch_size=4", "data.num_workers=0"]
    overrides += ["run.progress=false"]
    out = tmp_path / "ablation"
    assert cli(["ablate", "--seeds", "1", "--out", str(out), "--quick", "--select", "--arms", "baseline",
                "--set", *overrides]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Evaluated on the SELECTION split" in printed
    assert (out / "ablation.md").read_text().startswith("Evaluated on the SELECTION split")
    run_cfg = yaml.safe_load((out / "baseline" / "seed0" / "config.yaml").read_text())
    assert run_cfg["data"]["eval_dataset"] == "synthetic"
    assert run_cfg["data"]["eval_root"] == str(selection_root(world))
    assert run_cfg["data"]["root"] == str(world)  # trained on the same train scenes

    assert cli(["ablate", "--seeds", "1", "--out", str(out), "--quick", "--arms", "baseline", "--set", *overrides]) == 0
    assert "Evaluated on val" in capsys.readouterr().out
    assert yaml.safe_load((out / "baseline" / "seed0" / "config.yaml").read_text())["data"]["eval_root"] == ""
