"""Build an open_clip CLIP model from a model name or a model-config JSON, with optional weights.

``create_clip`` is the one place clipzss constructs CLIP: the frozen teacher, the tiny CLIP that the offline
synthetic world pretrains, and the text encoder used at test time all come from it.

A JSON config is open_clip's own model-config format (``{"embed_dim", "vision_cfg", "text_cfg"}``) plus an
optional clipzss-only section ``"clipzss": {"output_stride": 8, "vocabulary": [...]}``. A ``vocabulary`` (BPE token
strings) restricts the text tower to those tokens (see :class:`VocabularyTokenizer`): a model trained on a closed
set of words, like the synthetic world's teacher, then ships a token embedding of a few dozen rows, not 49,408.

For a ModifiedResNet vision tower, an output stride of 8 or 16 removes the anti-aliasing stride-2 average pools of
the last stages after construction, so a small image keeps a usable dense map (a 64-px image gives an 8x8 map at
stride 8 instead of 2x2 at stride 32). The attention pool's positional embedding was created for an
``image_size // 32`` grid; it is resized (bilinear) to the new ``image_size // output_stride`` grid at construction,
so the model's own forward still works at ``image_size`` and its checkpoints carry the larger embedding. Loading a
checkpoint whose attnpool embedding has another grid (e.g. a stride-32 RN50) resizes it the same way. At other input
sizes the teacher interpolates it again per grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn

from clipzss.paths import resolve_path

Tokenizer = Callable[[list[str]], Tensor]

RESNET_STAGE_STRIDES = {"layer2": 8, "layer3": 16, "layer4": 32}  # cumulative stride after each strided stage


def create_clip(model: str, pretrained: str = "") -> tuple[open_clip.model.CLIP, Tokenizer, tuple, tuple]:
    """Build a CLIP model and its tokenizer.

    Args:
        model: an open_clip model name ("ViT-B-16", "RN50", ...) or a path to an open_clip model-config JSON
            (optionally with a ``"clipzss": {"output_stride": 8 | 16 | 32}`` section, ModifiedResNet towers only).
        pretrained: "" for random init; an existing file for a local state dict (open_clip's ``load_checkpoint``,
            ``torch.load(weights_only=True)``); otherwise an open_clip pretrained tag (downloads from a hub).
            Paths may start with ``~`` or ``@assets/`` (the package's shipped assets).

    Returns:
        (model in eval mode, tokenizer mapping a list of strings to token ids [N, context_length],
        image mean, image std) - mean/std are the RGB normalisation the model expects on [0, 1] images.
    """
    model, pretrained = resolve_path(model), resolve_path(pretrained)
    if model.endswith(".json") or Path(model).is_file():
        clip, tokenizer = _create_from_json(Path(model))
        if pretrained:
            _load_local(clip, pretrained, model)
    else:
        clip, tokenizer = _create_named(model, pretrained)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return clip.eval(), tokenizer, mean, std


def resize_grid_pos_embed(pos_embed: Tensor, grid: tuple[int, int], mode: str) -> Tensor:
    """Resize a positional embedding with one leading class token to a new square-origin token grid.

    Args:
        pos_embed: [1 + g*g, W], the class-token embedding first, then a g x g grid in raster order.
        grid: target (h', w').
        mode: "bicubic" (ViT grids) or "bilinear" (ResNet attention pool).

    Returns:
        [1 + h'*w', W] in the same layout (unchanged if the grid already matches).
    """
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    side = math.isqrt(grid_pos.shape[0])
    if side * side != grid_pos.shape[0]:
        raise ValueError(f"clip_factory: positional embedding with {grid_pos.shape[0]} grid tokens is not square")
    if (side, side) == tuple(grid):
        return pos_embed
    grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
    grid_pos = F.interpolate(grid_pos.float(), size=tuple(grid), mode=mode, align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos_embed.dtype)  # [h'*w', W]
    return torch.cat([cls_pos, grid_pos], dim=0)


def _create_named(model: str, pretrained: str) -> tuple[open_clip.model.CLIP, Tokenizer]:
    if model not in open_clip.list_models():
        raise ValueError(
            f"clip_factory: {model!r} is neither an open_clip model name (see open_clip.list_models()) "
            "nor a model-config .json file"
        )
    if pretrained and not Path(pretrained).is_file():
        try:
            clip = open_clip.create_model(model, pretrained=pretrained)
        except Exception as e:  # download / hub / unknown-tag failures all surface here
            raise RuntimeError(
                f"clip_factory: could not load pretrained weights {pretrained!r} for open_clip model {model!r} "
                f"({type(e).__name__}: {e}). Without internet access, set teacher.pretrained to a local "
                "checkpoint path (a state dict saved from this architecture)."
            ) from e
    else:
        clip = open_clip.create_model(model, pretrained=pretrained or None)
    return clip, open_clip.get_tokenizer(model)


def _create_from_json(path: Path) -> tuple[open_clip.model.CLIP, Tokenizer]:
    if not path.is_file():
        raise FileNotFoundError(f"clip_factory: model config {str(path)!r} does not exist")
    cfg = json.loads(path.read_text())
    extra = cfg.pop("clipzss", {})
    unknown = set(extra) - {"output_stride", "vocabulary"}
    if unknown:
        raise ValueError(
            f"clipzss: {path}: unknown keys {sorted(unknown)} in 'clipzss' (allowed: output_stride, vocabulary)"
        )
    text_cfg = cfg.get("text_cfg", {})
    if cfg.pop("custom_text", False) or text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"clip_factory: {path}: only the plain OpenAI-BPE text tower is supported for JSON configs")
    try:
        clip = open_clip.CLIP(**cfg)
    except TypeError as e:
        raise ValueError(f"clip_factory: {path}: not a plain CLIP model config ({e})") from e
    if "output_stride" in extra:
        set_resnet_output_stride(clip.visual, extra["output_stride"], source=str(path))
    tokenizer = open_clip.get_tokenizer("", context_length=text_cfg.get("context_length", 77))
    if "vocabulary" in extra:
        tokenizer = VocabularyTokenizer(tokenizer, extra["vocabulary"], source=str(path))
        if len(extra["vocabulary"]) != text_cfg.get("vocab_size"):
            raise ValueError(
                f"clip_factory: {path}: text_cfg.vocab_size is {text_cfg.get('vocab_size')}, but clipzss.vocabulary "
                f"has {len(extra['vocabulary'])} tokens"
            )
    return clip, tokenizer


class VocabularyTokenizer:
    """open_clip's BPE tokenizer restricted to a small vocabulary of BPE token strings.

    Token ids are renumbered 0..V-1 in BPE-id order, so the end-of-text token keeps the largest id (open_clip pools
    the text at ``argmax`` of the ids) and padding (BPE id 0) stays 0. A token outside the vocabulary maps to 0: a
    model trained on a closed set of words has learnt nothing about other words.
    """

    def __init__(self, base: open_clip.tokenizer.SimpleTokenizer, vocabulary: list[str], source: str = "") -> None:
        unknown = [t for t in vocabulary if t not in base.encoder]
        if unknown:
            raise ValueError(f"clip_factory: {source}: clipzss.vocabulary holds non-BPE tokens {unknown[:5]}")
        ids = [base.encoder[t] for t in vocabulary]
        required = {0, base.sot_token_id, base.eot_token_id}
        if ids != sorted(set(ids)) or not required <= set(ids):
            raise ValueError(
                f"clip_factory: {source}: clipzss.vocabulary must list distinct tokens in BPE-id order, including "
                f"{[base.decoder[i] for i in sorted(required)]}"
            )
        self.base = base
        self.lut = torch.zeros(len(base.encoder), dtype=torch.long)  # BPE id -> vocabulary row
        self.lut[torch.tensor(ids)] = torch.arange(len(ids))

    def __call__(self, texts: list[str]) -> Tensor:
        """[N] strings -> [N, context_length] vocabulary rows."""
        return self.lut[self.base(texts)]


def set_resnet_output_stride(visual: nn.Module, output_stride: int, source: str = "") -> None:
    """Remove the stride-2 average pools of a ModifiedResNet's last stages in place (no parameters change).

    Also resizes ``attnpool.positional_embedding`` (bilinear) to the new ``image_size // output_stride`` grid.
    """
    if not isinstance(visual, ModifiedResNet):
        kind = type(visual).__name__
        raise ValueError(f"{source}: clipzss.output_stride needs a ModifiedResNet vision tower, got {kind}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"{source}: clipzss.output_stride must be 8, 16 or 32, got {output_stride!r}")
    for name, stride in RESNET_STAGE_STRIDES.items():
        if stride > output_stride:
            block = getattr(visual, name)[0]  # only the first Bottleneck of a stage downsamples
            block.avgpool = nn.Identity()
            block.downsample[0] = nn.Identity()  # the stride-2 AvgPool2d named "-1" in open_clip
            block.stride = 1
    side = visual.image_size // output_stride
    pos = visual.attnpool.positional_embedding
    visual.attnpool.positional_embedding = nn.Parameter(resize_grid_pos_embed(pos.data, (side, side), "bilinear"))


def _load_local(clip: open_clip.model.CLIP, path: str, model: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"clip_factory: pretrained={path!r} for JSON model {model!r} must be a local checkpoint file "
            "(open_clip pretrained tags only apply to open_clip model names)"
        )
    state = open_clip.factory.load_state_dict(path, weights_only=True)  # unwraps {"state_dict": ...}, "module."
    if isinstance(clip.visual, ModifiedResNet):
        key = "visual.attnpool.positional_embedding"
        target = clip.visual.attnpool.positional_embedding
        if key in state and state[key].shape != target.shape:
            side = math.isqrt(target.shape[0] - 1)
            state[key] = resize_grid_pos_embed(state[key], (side, side), "bilinear")
    open_clip.model.resize_pos_embed(state, clip)  # a ViT checkpoint trained at another image size
    clip.load_state_dict(state, strict=True)
