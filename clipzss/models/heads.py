"""Decode heads for multi-scale backbone features; each ends in a 1x1 projection to the CLIP joint dim C.

UPerHead follows mmsegmentation's UPerHead (the decode head of its Swin configs; Xiao et al., "Unified Perceptual
Parsing", ECCV 2018): a pyramid pooling module on the coarsest level, an FPN top-down path, fusion of all levels at
the finest resolution. FPNHead is mmsegmentation's Semantic FPN (FPN neck + FPNHead; Kirillov et al., "Panoptic
Feature Pyramid Networks", CVPR 2019). In both, the classifier of the closed-set model is replaced by ``proj``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmseg's ConvModule with BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UPerNet head: PPM + FPN + fusion, then a 1x1 projection to ``out_channels``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        out_channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels, 1)) for s in pool_scales
        )
        self.ppm_bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.proj = nn.Conv2d(channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Features [B, C_i, H/s_i, W/s_i] (finest first) -> [B, out_channels, H/s_0, W/s_0]."""
        top = feats[-1]
        pooled = [resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1], strict=True)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))
        return self.proj(self.dropout(fused))


class FPNHead(nn.Module):
    """Semantic FPN: FPN neck, per-level conv + 2x upsampling towers to the finest level, sum, 1x1 projection."""

    def __init__(self, in_channels: Sequence[int], channels: int, out_channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.towers = nn.ModuleList()
        for level in range(len(in_channels)):  # level i is 2**i coarser than level 0
            layers: list[nn.Module] = []
            for _ in range(max(1, level)):
                layers.append(conv_bn_relu(channels, channels, 3))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.towers.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.proj = nn.Conv2d(channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Features [B, C_i, H/s_i, W/s_i] (finest first, s_i = s_0 * 2**i) -> [B, out_channels, H/s_0, W/s_0]."""
        laterals = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        size = laterals[0].shape[-2:]
        # odd sizes make 2x upsampling overshoot by a pixel: resize each tower's output to the finest grid
        out = sum(
            resize(tower(conv(x)), size) for tower, conv, x in zip(self.towers, self.smooth, laterals, strict=True)
        )
        return self.proj(self.dropout(out))
