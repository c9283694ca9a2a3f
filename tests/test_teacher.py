"""CLIPTeacher on tiny random-init ViT and ModifiedResNet towers built from JSON configs."""

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipzss import paths
from clipzss.config import TeacherConfig
from clipzss.models.prompts import class_prompts, get_templates
from clipzss.models.teacher import CLIPTeacher, _file_stamp

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
VIT = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}}
RESNET = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32, "patch_size": None},
    "clipzss": {"output_stride": 8},
}
# (input size, expected dense grid) per tower: ViT patch 8, ResNet output stride 8
SIZES = {"vit": [((32, 32), (4, 4)), ((48, 64), (6, 8))], "resnet": [((64, 64), (8, 8)), ((96, 64), (12, 8))]}
NATIVE = {"vit": 32, "resnet": 64}
CLIP_MEAN, CLIP_STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # what create_clip reports for JSON models


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """JSON configs of both tiny towers and a saved random-init checkpoint for each."""
    from clipzss.models.clip_factory import create_clip

    root = tmp_path_factory.mktemp("clip")
    files = {}
    for name, cfg in (("vit", VIT), ("resnet", RESNET)):
        path = root / f"{name}.json"
        path.write_text(json.dumps({**cfg, "text_cfg": TEXT}))
        torch.manual_seed(1)
        model, *_ = create_clip(str(path))
        torch.save(model.state_dict(), root / f"{name}.pt")
        files[name] = (str(path), str(root / f"{name}.pt"))
    return files


def make_teacher(model_files, tower, tmp_path, dense="value", templates="single", **kwargs) -> CLIPTeacher:
    config, weights = model_files[tower]
    cfg = TeacherConfig(model=config, pretrained=weights, dense=dense, templates=templates, cache_dir=str(tmp_path))
    return CLIPTeacher(cfg, **kwargs)


def normalise(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("dense", ["value", "tokens"])
@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_shapes_and_unit_norm_at_two_sizes(model_files, tmp_path, tower, dense):
    teacher = make_teacher(model_files, tower, tmp_path, dense=dense)
    for (height, width), grid in SIZES[tower]:
        out = teacher(torch.randn(2, 3, height, width))
        assert out.cls.shape == (2, teacher.embed_dim) == (2, 48)
        assert out.dense.shape == (2, 48, *grid)
        torch.testing.assert_close(out.cls.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(out.dense.norm(dim=1), torch.ones(2, *grid))


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_cls_equals_open_clip_image_embedding_after_input_conversion(model_files, tmp_path, tower):
    """A student-normalised input gives S = open_clip's encode_image of the CLIP-normalised same image."""
    teacher = make_teacher(model_files, tower, tmp_path)
    raw = torch.rand(2, 3, NATIVE[tower], NATIVE[tower])
    expected = F.normalize(teacher.clip.encode_image(normalise(raw, CLIP_MEAN, CLIP_STD)), dim=-1)
    torch.testing.assert_close(teacher(normalise(raw, IMAGENET_MEAN, IMAGENET_STD)).cls, expected)


@pytest.mark.parametrize("dense", ["value", "tokens"])
def test_vit_dense_equals_reference(model_files, tmp_path, dense):
    """value: the last block's attention forced onto the diagonal, without residual/MLP (MaskCLIP); tokens: the
    plain last-layer patch tokens."""
    teacher = make_teacher(model_files, "vit", tmp_path, dense=dense, input_mean=CLIP_MEAN, input_std=CLIP_STD)
    visual = teacher.clip.visual
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        if dense == "value":
            y = last.ln_1(x)
            self_only = torch.full((y.shape[1], y.shape[1]), float("-inf")).fill_diagonal_(0.0)
            tokens = last.attn(y, y, y, attn_mask=self_only, need_weights=False)[0]
        else:
            tokens = last(x)
        reference = F.normalize(visual.ln_post(tokens)[:, 1:] @ visual.proj, dim=-1)  # [B, L, C]
    out = teacher(images)
    torch.testing.assert_close(out.dense.flatten(2).transpose(1, 2), reference)


@pytest.mark.parametrize("dense", ["value", "tokens"])
def test_resnet_dense_equals_reference(model_files, tmp_path, dense):
    """Each location of layer4 (+ attnpool positional embedding for "value") through v_proj then c_proj."""
    teacher = make_teacher(model_files, "resnet", tmp_path, dense=dense, input_mean=CLIP_MEAN, input_std=CLIP_STD)
    visual = teacher.clip.visual
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = visual.forward_intermediates(images, intermediates_only=True)["image_intermediates"][-1]
        batch, channels, h, w = fmap.shape
        per_location = fmap.flatten(2).transpose(1, 2)  # [B, L, Cr]
        if dense == "value":
            per_location = per_location + visual.attnpool.positional_embedding[1:]
        pool = visual.attnpool
        reference = F.normalize(pool.c_proj(pool.v_proj(per_location)), dim=-1)
    out = teacher(images)
    torch.testing.assert_close(out.dense.flatten(2).transpose(1, 2), reference)


def test_frozen_four_ways(model_files, tmp_path):
    teacher = make_teacher(model_files, "resnet", tmp_path)
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Module()
    parent.teacher = teacher
    parent.head = torch.nn.Linear(3, 3)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent.head.training
    bn = teacher.clip.visual.bn1
    stats = bn.running_mean.clone()
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = teacher(images)
    assert not out.cls.requires_grad and not out.dense.requires_grad
    torch.testing.assert_close(bn.running_mean, stats)  # BatchNorm statistics did not move
    assert teacher.state_dict() == {}
    saved = parent.state_dict()
    assert set(saved) == {"head.weight", "head.bias"}
    parent.load_state_dict(saved, strict=True)  # a checkpoint without teacher keys loads strictly
    trainable = [p for p in parent.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable)
    assert sum(p.numel() for g in optimiser.param_groups for p in g["params"]) == 3 * 3 + 3


def test_encode_text_ensemble_normalised_and_cached_on_disk(model_files, tmp_path, monkeypatch):
    classes = ["cat", "potted_plant", "wall-concrete"]
    teacher = make_teacher(model_files, "vit", tmp_path, templates="zegclip")
    text = teacher.encode_text(classes)
    assert text.shape == (3, 48)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    with torch.no_grad():  # plain reference for one class: mean of normalised template embeddings, renormalised
        prompts = teacher.tokenizer(class_prompts("potted_plant", get_templates("zegclip")))
        expected = F.normalize(F.normalize(teacher.clip.encode_text(prompts), dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(text[1], expected)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    fresh = make_teacher(model_files, "vit", tmp_path, templates="zegclip")

    def never(*args, **kwargs):
        raise AssertionError("the text tower must not run on a cache hit")

    monkeypatch.setattr(fresh.clip, "encode_text", never)
    torch.testing.assert_close(fresh.encode_text(classes), text)  # read from the disk cache
    torch.testing.assert_close(fresh.encode_text(classes), text)  # and then from memory

    single = make_teacher(model_files, "vit", tmp_path, templates="single")
    assert single._text_key(classes) != teacher._text_key(classes)
    single.encode_text(classes)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_random_init_teacher_caches_text_in_memory_only(model_files, tmp_path):
    config, _ = model_files["vit"]
    teacher = CLIPTeacher(TeacherConfig(model=config, pretrained="", templates="single", cache_dir=str(tmp_path)))
    first = teacher.encode_text(["cat"])
    assert first is not None and not list(tmp_path.iterdir())


def test_class_prompts_replace_separators():
    assert class_prompts("wall-concrete_x", ("a photo of a {}.",)) == ["a photo of a wall concrete x."]


def test_text_cache_key_follows_a_retrained_shipped_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ASSETS", tmp_path)  # "@assets/..." resolves here
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"old weights")
    old = _file_stamp("@assets/teacher.pt")
    assert old is not None and old == _file_stamp(str(weights))
    weights.write_bytes(b"retrained weights")
    assert _file_stamp("@assets/teacher.pt") != old  # a stale text cache is never read
