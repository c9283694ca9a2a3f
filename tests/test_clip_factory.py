"""create_clip: JSON configs (with the clipzss output stride), named architectures, weights round-trip, errors."""

import json

import open_clip
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet

from clipzss.models.clip_factory import VocabularyTokenizer, create_clip, resize_grid_pos_embed

TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3}


def tiny_resnet_config(output_stride: int | None = 8) -> dict:
    """The offline world's tiny CLIP: ModifiedResNet [1,1,1,1], width 16, 64 px, embed 128."""
    cfg = {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32, "patch_size": None},
        "text_cfg": TINY_TEXT,
    }
    if output_stride is not None:
        cfg["clipzss"] = {"output_stride": output_stride}
    return cfg


def write_json(tmp_path, cfg: dict, name: str = "tiny.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("output_stride, grid", [(None, 2), (16, 4), (8, 8)])
def test_json_resnet_output_stride_sets_dense_grid(tmp_path, output_stride, grid):
    model, tokenizer, mean, std = create_clip(write_json(tmp_path, tiny_resnet_config(output_stride)))
    assert isinstance(model.visual, ModifiedResNet)
    assert not model.training
    feats = model.visual.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True)
    assert feats["image_intermediates"][-1].shape[-2:] == (grid, grid)
    assert model.visual.attnpool.positional_embedding.shape[0] == grid * grid + 1
    # the model's own forward still works at its image size
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    tokens = tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 16)
    assert model.encode_text(tokens).shape == (2, 128)
    assert len(mean) == len(std) == 3


def test_json_weights_round_trip(tmp_path):
    path = write_json(tmp_path, tiny_resnet_config())
    model, *_ = create_clip(path)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    loaded, *_ = create_clip(path, str(ckpt))
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))


def test_stride32_checkpoint_loads_into_stride8_config(tmp_path):
    src, *_ = create_clip(write_json(tmp_path, tiny_resnet_config(None), "s32.json"))
    ckpt = tmp_path / "s32.pt"
    torch.save({"state_dict": src.state_dict()}, ckpt)  # open_clip training-checkpoint layout
    dst, *_ = create_clip(write_json(tmp_path, tiny_resnet_config(8), "s8.json"), str(ckpt))
    torch.testing.assert_close(dst.visual.conv1.weight, src.visual.conv1.weight)
    assert dst.visual.attnpool.positional_embedding.shape[0] == 8 * 8 + 1


def test_named_architecture_random_init_and_weights_file(tmp_path):
    model, tokenizer, mean, std = create_clip("ViT-S-32")
    assert not model.training
    assert tokenizer(["a cat"]).shape == (1, 77)
    ckpt = tmp_path / "vits32.pt"
    torch.save(model.state_dict(), ckpt)
    loaded, *_ = create_clip("ViT-S-32", str(ckpt))
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not-a-model"):
        create_clip("not-a-model")
    with pytest.raises(RuntimeError, match=r"'openai'.*'RN50'.*local checkpoint"):
        create_clip("RN50", "openai")
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    vit = {"embed_dim": 32, "vision_cfg": vision}
    with pytest.raises(ValueError, match="ModifiedResNet"):
        create_clip(write_json(tmp_path, {**vit, "text_cfg": TINY_TEXT, "clipzss": {"output_stride": 8}}))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_clip(write_json(tmp_path, tiny_resnet_config()), str(tmp_path / "missing.pt"))


def test_resize_grid_pos_embed_keeps_class_token_and_identity():
    pos = torch.randn(1 + 4 * 4, 8)
    assert resize_grid_pos_embed(pos, (4, 4), "bicubic") is pos
    out = resize_grid_pos_embed(pos, (3, 5), "bilinear")
    assert out.shape == (1 + 15, 8)
    torch.testing.assert_close(out[0], pos[0])


def test_vocabulary_restricts_the_text_tower_and_keeps_eot_pooling(tmp_path):
    vocabulary = ["!", "a</w>", "photo</w>", "cat</w>", "<start_of_text>", "<end_of_text>"]  # BPE-id order
    full = open_clip.get_tokenizer("", context_length=16)
    assert [full.encoder[t] for t in vocabulary] == sorted(full.encoder[t] for t in vocabulary)
    cfg = tiny_resnet_config()
    cfg["text_cfg"] = {**TINY_TEXT, "vocab_size": len(vocabulary)}
    cfg["clipzss"]["vocabulary"] = vocabulary
    model, tokenizer, *_ = create_clip(write_json(tmp_path, cfg))
    assert isinstance(tokenizer, VocabularyTokenizer)
    assert model.token_embedding.weight.shape == (len(vocabulary), TINY_TEXT["width"])
    tokens = tokenizer(["a photo a cat", "a dog"])  # "dog" is outside the vocabulary
    assert tokens[0, :6].tolist() == [4, 1, 2, 1, 3, 5] and tokens[0, 6:].eq(0).all()
    assert tokens[1, :4].tolist() == [4, 1, 0, 5]
    assert (tokens.argmax(1) == torch.tensor([5, 3])).all()  # open_clip pools at the end-of-text token
    assert model.encode_text(tokens).shape == (2, 128)


@pytest.mark.parametrize(
    "vocabulary, size, message",
    [
        (["!", "a</w>", "<start_of_text>", "<end_of_text>"], 5, "vocab_size is 5, but clipzss.vocabulary has 4"),
        (["!", "zzqx</w>", "<start_of_text>", "<end_of_text>"], 4, "non-BPE tokens \\['zzqx</w>'\\]"),
        (["a</w>", "!", "<start_of_text>", "<end_of_text>"], 4, "in BPE-id order"),
        (["!", "a</w>", "<end_of_text>"], 3, "including"),
    ],
)
def test_bad_vocabularies_name_the_problem(tmp_path, vocabulary, size, message):
    cfg = tiny_resnet_config()
    cfg["text_cfg"] = {**TINY_TEXT, "vocab_size": size}
    cfg["clipzss"]["vocabulary"] = vocabulary
    with pytest.raises(ValueError, match=message):
        create_clip(write_json(tmp_path, cfg))
