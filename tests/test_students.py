"""Student segmenters: every STUDENTS entry builds; the tiny ones run forward and backward on CPU."""

import pytest
import torch

from clipzss.config import StudentConfig
from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipzss.models.students import STUDENTS, build_student

TINY = ["segformer_tiny", "swin_tiny_test", "resnet_tiny"]
C = 24


@pytest.mark.parametrize("arch", TINY)
def test_tiny_student_forward_backward(arch):
    student = build_student(StudentConfig(arch=arch, decoder_channels=16), C).train()
    for height, width in [(64, 64), (80, 48)]:
        out = student(torch.randn(2, 3, height, width))
        assert out.shape == (2, C, height // 4, width // 4)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2, height // 4, width // 4))
    out.mean().backward()  # a direction-dependent loss: normalisation does not cancel the gradient
    for part in (student.backbone, student.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), arch


@pytest.mark.parametrize("arch", sorted(set(STUDENTS) - set(TINY)))
def test_full_size_students_build_on_meta_device(arch):
    """The real architectures are built without memory (meta tensors): config and wiring only."""
    with torch.device("meta"):
        student = build_student(StudentConfig(arch=arch), 512)
    assert sum(p.numel() for p in student.parameters()) > 3_000_000
    projections = [m for m in student.head.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 512]
    assert projections and projections[-1].kernel_size == (1, 1)


def test_unknown_arch_lists_allowed():
    with pytest.raises(ValueError, match="segformer_b0.*resnet_tiny"):
        build_student(StudentConfig(arch="segnext_tiny"), C)


def test_timm_student_loads_local_weights_file(tmp_path):
    import timm

    from clipzss.models.students import RESNET_TINY

    source = timm.create_model("resnet10t", **RESNET_TINY)
    path = tmp_path / "resnet_tiny.pth"
    torch.save(source.state_dict(), path)
    student = build_student(StudentConfig(arch="resnet_tiny", pretrained=str(path), decoder_channels=16), C)
    torch.testing.assert_close(student.backbone.model.conv1[0].weight, source.conv1[0].weight)


@pytest.mark.parametrize(
    ("arch", "norm", "mean", "std"),
    [
        ("efficientnet_lite0", "model", (0.5,) * 3, (0.5,) * 3),  # timm's pretrained_cfg for tf_efficientnet_lite0
        ("efficientnet_lite0", "imagenet", IMAGENET_MEAN, IMAGENET_STD),  # ImageNet statistics for every student
        ("resnet_tiny", "model", IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_backbone_sees_its_own_input_normalisation(arch, norm, mean, std):
    student = build_student(StudentConfig(arch=arch, decoder_channels=16, input_norm=norm), C).eval()
    seen = []
    student.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    raw = torch.rand(1, 3, 32, 32)  # pixels in 0-1

    def channels(values):
        return torch.tensor(values).view(1, 3, 1, 1)

    student((raw - channels(IMAGENET_MEAN)) / channels(IMAGENET_STD))
    expected = (raw - channels(mean)) / channels(std)
    torch.testing.assert_close(seen[0], expected)
