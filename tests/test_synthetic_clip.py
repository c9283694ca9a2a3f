"""The tiny CLIP teacher of the synthetic world: the shipped checkpoint, its figures, and regenerating it."""

import json

import torch

from clipzss.config import TeacherConfig
from clipzss.data.splits import load_split
from clipzss.data.synthetic import CLASSES, IGNORE_INDEX, SPLITS
from clipzss.models.clip_factory import create_clip
from clipzss.models.teacher import CLIPTeacher
from clipzss.paths import ASSETS
from clipzss.synthetic_clip import (
    _cell_labels,
    caption,
    caption_batch,
    evaluate_synthetic_clip,
    model_config,
    predicted_text_cos,
    pretrain_synthetic_clip,
)

SHIPPED_JSON = ASSETS / "synthetic_clip.json"
SHIPPED_PT = ASSETS / "synthetic_clip.pt"
ZERO_SHOT_FLOOR = 0.85
DENSE_FLOOR = 0.5


def test_captions_name_the_visible_objects():
    assert caption([0, 5, CLASSES.index("grass")]) == "a photo of a red plain and a green striped and a grass."
    images, captions = caption_batch(seed=0, start=0, batch_size=200, single_fraction=0.5, size=32)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    again, same = caption_batch(seed=0, start=0, batch_size=200, single_fraction=0.5, size=32)
    assert torch.equal(images, again) and captions == same
    # CLIP pretraining covers every category of every split, unseen names and stuff included
    for split in SPLITS:
        assert all(any(name in c for c in captions) for name in load_split("synthetic", split).unseen)
    assert any(c.endswith("a photo of a sky.") for c in captions)  # stuff alone
    assert any(" and a " in c for c in captions)


def test_cell_labels_match_a_per_cell_loop():
    labels = torch.randint(0, 4, (2, 16, 16), dtype=torch.uint8)
    labels[labels == 3] = IGNORE_INDEX
    labels[0, :8, :8] = 2  # one pure cell
    cells = _cell_labels(labels, (4, 4))
    for b in range(2):
        for i in range(4):
            for j in range(4):
                block = labels[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].flatten().tolist()
                best = max(range(len(CLASSES)), key=block.count)
                expected = best if block.count(best) > 8 else IGNORE_INDEX
                assert cells[b, i, j] == expected
    assert cells[0, 0, 0] == 2


def test_shipped_teacher_loads_with_its_config(tmp_path):
    config = model_config()
    assert json.loads(SHIPPED_JSON.read_text()) == config
    assert SHIPPED_PT.stat().st_size < 5e6  # a 24-token vocabulary, not open_clip's 49,408 rows
    cfg = TeacherConfig(
        model=str(SHIPPED_JSON), pretrained=str(SHIPPED_PT), templates="single", cache_dir=str(tmp_path)
    )
    teacher = CLIPTeacher(cfg)
    out = teacher(torch.zeros(2, 3, 64, 64))
    assert out.cls.shape == (2, config["embed_dim"])
    assert out.dense.shape == (2, config["embed_dim"], 8, 8)  # output stride 8: an 8x8 token grid
    assert teacher.encode_text(list(CLASSES)).shape == (len(CLASSES), config["embed_dim"])


def test_shipped_teacher_stays_above_the_floor():
    figures = evaluate_synthetic_clip(str(SHIPPED_JSON), str(SHIPPED_PT), per_class=6, scenes=60)
    assert figures["zero_shot_acc"] >= ZERO_SHOT_FLOOR
    assert figures["dense_acc"] >= DENSE_FLOOR  # chance is 1 / 26
    for split in SPLITS:  # the teacher names unseen regions too: the signal a zero-shot student distils
        assert figures[f"dense_acc_unseen/{split}"] >= DENSE_FLOOR / 2, split
    assert figures["unseen_text_cos/noncompositional"] < figures["unseen_text_cos/compositional"]
    assert figures.keys() >= {f"dense_acc/{name}" for name in CLASSES}


def test_predicted_text_cos_is_one_for_mixtures_and_low_for_new_directions():
    text = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    text[4] = torch.nn.functional.normalize(text[0] + 2 * text[1], dim=0)  # a mix of seen texts
    cos = predicted_text_cos(text, [0, 1, 2, 3], [4, 5])
    assert cos[0] > 0.999 and cos[1] < 0.8


def test_pretraining_mechanics(tmp_path):
    figures = pretrain_synthetic_clip(tmp_path, steps=2, batch_size=8, warmup=1, progress=False)
    assert {"zero_shot_acc", "dense_acc", "pretrain_seconds", "final_loss"} <= set(figures)
    assert torch.isfinite(torch.tensor(figures["final_loss"]))
    state = torch.load(tmp_path / "synthetic_clip.pt", weights_only=True)
    assert state["visual.conv1.weight"].dtype == torch.float16
    create_clip(str(tmp_path / "synthetic_clip.json"), str(tmp_path / "synthetic_clip.pt"))
