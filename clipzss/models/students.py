"""Student segmenters: any closed-set segmentation network whose classifier becomes a 1x1 projection to C.

Backbones and heads come from maintained libraries: SegFormer (MiT encoder + all-MLP decode head) from
``transformers``, Swin and CNN encoders from ``timm`` (``features_only``) with the UPerNet / Semantic-FPN heads of
``clipzss.models.heads``. SegNeXt (MSCAN) is in neither timm 1.0 nor transformers 5, so it is not offered.

Every student gives R at stride 4: [B, C, H/4, W/4]. The tiny entries serve CPU tests and the 64x64 synthetic world
(parameters for C = 128, decoder_channels = 64, backbone in brackets): segformer_tiny 0.46 M (0.42 M),
swin_tiny_test 0.84 M (0.31 M), resnet_tiny 0.74 M (0.31 M).

Pretrained weights (``StudentConfig.pretrained``, "" = random init) go through each library's own mechanism:
SegFormer - a Hugging Face id ("nvidia/mit-b0") or a local directory for ``SegformerModel.from_pretrained``; timm -
a pretrained tag of the model ("in1k" -> ``resnet50.in1k``) or a local weights file (``pretrained_cfg_overlay``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerModel
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from clipzss.config import StudentConfig
from clipzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipzss.models.heads import FPNHead, UPerHead
from clipzss.models.offline_weights import OFFLINE_WEIGHTS

# MiT encoder sizes (hidden sizes, depths, attention heads) of the SegFormer paper's B0-B5, plus a tiny test size
MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], [1, 2, 5, 8]),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], [1, 2, 5, 8]),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], [1, 2, 5, 8]),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], [1, 2, 5, 8]),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], [1, 2, 5, 8]),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], [1, 2, 5, 8]),
    "tiny": ([16, 32, 64, 128], [1, 1, 1, 1], [1, 1, 2, 4]),
}


class Student(nn.Module):
    """A backbone giving multi-scale features and a decode head ending in a 1x1 projection to C.

    Images arrive normalised with ImageNet's mean / std (the data pipeline's one convention); a backbone pretrained
    with another normalisation (timm's ``pretrained_cfg``: EfficientNet-Lite takes mean = std = 0.5) gets its own,
    re-normalised here: x' = (x * std_in + mean_in - mean) / std.

    Args:
        backbone, head: the network.
        mean, std: RGB in the 0-1 scale the backbone expects (default: ImageNet's, no re-normalisation).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.renormalise = tuple(mean) != IMAGENET_MEAN or tuple(std) != IMAGENET_STD
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean, std = torch.tensor(tuple(mean)), torch.tensor(tuple(std))
        self.register_buffer("input_scale", (in_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((in_mean - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] ImageNet-normalised -> R [B, C, h, w], L2-normalised over C (h = H/4)."""
        if self.renormalise:
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        return F.normalize(self.head(self.backbone(images)), dim=1)


class SegformerEncoder(nn.Module):
    """transformers' MiT encoder returning its four stage outputs [B, C_i, H/4/2**i, W/4/2**i]."""

    def __init__(self, model: SegformerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.model(pixel_values=images, output_hidden_states=True).hidden_states)

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``mlflow.pytorch.load_model`` in a fresh process) skips ``PreTrainedModel.__init__``, where
        transformers 5 registers the class's output recorders; unregistered, the model returns no hidden states."""
        super().__setstate__(state)
        from transformers.utils import output_capturing

        output_capturing._CAN_RECORD_REGISTRY[self.model] = self.model._can_record_outputs


class TimmFeatures(nn.Module):
    """A timm ``features_only`` network; channels-last outputs (Swin) are returned as [B, C_i, h_i, w_i]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = self.model(images)
        return [f.permute(0, 3, 1, 2) for f in feats] if self.channels_last else list(feats)


def build_segformer(cfg: StudentConfig, embed_dim: int, variant: str) -> Student:
    """SegFormer: MiT encoder + all-MLP decode head whose 1x1 classifier (num_labels = C) is the projection."""
    if cfg.pretrained:
        try:
            encoder = SegformerModel.from_pretrained(cfg.pretrained)
        except OSError as e:
            raise RuntimeError(
                f"student.pretrained={cfg.pretrained!r}: cannot load SegFormer weights ({e}); offline, use a local "
                "directory saved with save_pretrained()"
            ) from e
        config = SegformerConfig.from_dict(encoder.config.to_dict())
    else:
        hidden_sizes, depths, heads = MIT[variant]
        config = SegformerConfig(hidden_sizes=hidden_sizes, depths=depths, num_attention_heads=heads)
        encoder = SegformerModel(config)
    config.num_labels = embed_dim
    config.decoder_hidden_size = cfg.decoder_channels
    return Student(SegformerEncoder(encoder), SegformerDecodeHead(config))


def build_timm(
    cfg: StudentConfig,
    proj_dim: int,
    model: str,
    out_indices: Sequence[int],
    head: str,
    **model_kwargs,
) -> Student:
    """A timm ``features_only`` backbone (levels at strides 4-32) with a UPerNet ("upernet") or FPN ("fpn") head.

    ``proj_dim`` is C (named apart from timm's own ``embed_dim`` keyword, which Swin sizes take in model_kwargs).
    """
    name, overlay = model, None
    if cfg.pretrained in OFFLINE_WEIGHTS:
        overlay = {"file": str(OFFLINE_WEIGHTS[cfg.pretrained]())}
    elif cfg.pretrained and Path(cfg.pretrained).expanduser().is_file():
        overlay = {"file": str(Path(cfg.pretrained).expanduser())}
    elif cfg.pretrained:
        name = f"{model}.{cfg.pretrained}"
    try:
        network = timm.create_model(
            name,
            pretrained=bool(cfg.pretrained),
            pretrained_cfg_overlay=overlay,
            features_only=True,
            out_indices=tuple(out_indices),
            **model_kwargs,
        )
    except (RuntimeError, OSError) as e:
        if not cfg.pretrained:
            raise
        raise RuntimeError(
            f"student.pretrained={cfg.pretrained!r}: cannot load timm weights for {name!r} ({e}); offline, pass a "
            "local weights file"
        ) from e
    channels = network.feature_info.channels()
    head_cls = UPerHead if head == "upernet" else FPNHead
    norm = {}
    if cfg.input_norm == "model":  # the normalisation timm pretrained this model with (also under random init)
        norm = {"mean": network.pretrained_cfg["mean"], "std": network.pretrained_cfg["std"]}
    return Student(TimmFeatures(network), head_cls(channels, cfg.decoder_channels, proj_dim), **norm)


SWIN_TINY_TEST = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 4), "window_size": 4}
RESNET_TINY = {"channels": (16, 32, 64, 128), "stem_width": 8}

STUDENTS: dict[str, Callable[[StudentConfig, int], Student]] = {
    **{f"segformer_{v}": partial(build_segformer, variant=v) for v in ("b0", "b1", "b2", "b3", "b4", "b5")},
    "segformer_tiny": partial(build_segformer, variant="tiny"),
    # Swin (+ UPerNet, as in mmseg); strict_img_size=False pads windows so any crop size works
    "swin_tiny": partial(
        build_timm, model="swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3), head="upernet",
        strict_img_size=False,
    ),
    "swin_small": partial(
        build_timm, model="swin_small_patch4_window7_224", out_indices=(0, 1, 2, 3), head="upernet",
        strict_img_size=False,
    ),
    "swin_base": partial(
        build_timm, model="swin_base_patch4_window7_224", out_indices=(0, 1, 2, 3), head="upernet",
        strict_img_size=False,
    ),
    "swin_tiny_test": partial(
        build_timm, model="swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3), head="upernet",
        strict_img_size=False, img_size=64, **SWIN_TINY_TEST,
    ),
    # timm CNNs (+ Semantic FPN); out_indices pick the stride 4, 8, 16, 32 levels of each model
    "resnet50": partial(build_timm, model="resnet50", out_indices=(1, 2, 3, 4), head="fpn"),
    "resnet101": partial(build_timm, model="resnet101", out_indices=(1, 2, 3, 4), head="fpn"),
    "convnext_tiny": partial(build_timm, model="convnext_tiny", out_indices=(0, 1, 2, 3), head="fpn"),
    "efficientnet_lite0": partial(build_timm, model="tf_efficientnet_lite0", out_indices=(1, 2, 3, 4), head="fpn"),
    "resnet_tiny": partial(build_timm, model="resnet10t", out_indices=(1, 2, 3, 4), head="fpn", **RESNET_TINY),
}  # fmt: skip


def build_student(cfg: StudentConfig, embed_dim: int) -> Student:
    """Build ``STUDENTS[cfg.arch]`` with a projection to ``embed_dim`` (C)."""
    if cfg.arch not in STUDENTS:
        raise ValueError(f"student.arch: unknown architecture {cfg.arch!r}; allowed: {', '.join(STUDENTS)}")
    return STUDENTS[cfg.arch](cfg, embed_dim)
