"""The frozen CLIP teacher: image embedding S, dense tokens D, text classifier T (docs/pages/method.md, "Teacher").

Frozen four ways: every parameter has ``requires_grad=False``; ``train()`` always leaves it in eval mode (BatchNorm
statistics of ResNet towers never move); ``forward`` and ``encode_text`` run under ``torch.no_grad()``; and it is
never checkpointed - ``state_dict()`` is empty, also when the teacher is nested in another module, and a strict
``load_state_dict`` of such a parent accepts checkpoints without teacher keys (the weights come from
``cfg.teacher.pretrained``). Its parameters still appear in a parent's ``parameters()``: build optimiser groups from
parameters with ``requires_grad`` (or keep the teacher outside the trained module).

Dense tokens D (``cfg.dense``):
- "value" (MaskCLIP): ViT - in the last block, the value projection of ``ln_1(x)`` for every token, then the
  attention's ``out_proj``, skipping q.k attention, the residual and the MLP; then ``ln_post`` and ``proj``.
  ResNet (ModifiedResNet) - each location of the last feature map plus the (interpolated) attention-pool positional
  embedding, through the attention pool's ``v_proj`` then ``c_proj``.
- "tokens": ViT - the plain last-layer patch tokens after ``ln_post`` and ``proj``. ResNet - a ResNet has no
  output tokens, so the feature map goes through ``v_proj`` + ``c_proj`` (the only projection into the joint space)
  without the positional embedding.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from clipzss.config import TeacherConfig
from clipzss.engine.checkpoint import atomic_save
from clipzss.models.clip_factory import create_clip, resize_grid_pos_embed
from clipzss.models.prompts import class_prompts, get_templates
from clipzss.paths import resolve_path


@dataclass
class TeacherOutput:
    """What the teacher gives the objective for one batch."""

    cls: Tensor  # S [B, C], L2-normalised image embedding
    dense: Tensor  # D [B, C, h', w'], L2-normalised per-location embeddings


class CLIPTeacher(nn.Module):
    """Frozen open_clip model producing S, D (any input size) and prompt-ensemble text embeddings T."""

    def __init__(
        self,
        cfg: TeacherConfig,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        """Build the teacher.

        Args:
            cfg: the teacher section of the config (model, pretrained, dense, templates, cache_dir).
            input_mean: RGB mean of the normalisation applied to the images given to ``forward`` (the student's).
            input_std: RGB std of that normalisation.
        """
        super().__init__()
        clip, self.tokenizer, clip_mean, clip_std = create_clip(cfg.model, cfg.pretrained)
        self.clip = clip.requires_grad_(False).eval()
        visual = self.clip.visual
        if isinstance(visual, VisionTransformer):
            _check_vit(visual, cfg.model)
        elif not isinstance(visual, ModifiedResNet):
            raise ValueError(
                f"teacher.model={cfg.model!r}: vision tower {type(visual).__name__} is not supported "
                "(VisionTransformer or ModifiedResNet)"
            )
        self.dense_mode = cfg.dense
        self.embed_dim: int = visual.output_dim
        self.templates = get_templates(cfg.templates)
        self.cache_dir = Path(cfg.cache_dir).expanduser()
        # random-init weights differ per seed, so their text embeddings are cached in memory only
        self.weights_id = [cfg.model, cfg.pretrained, _file_stamp(cfg.model), _file_stamp(cfg.pretrained)]
        self.disk_cache = bool(cfg.pretrained)
        # x_clip = (x * in_std + in_mean - clip_mean) / clip_std = x * scale + shift, per channel
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        clip_mean, clip_std = torch.tensor(clip_mean), torch.tensor(clip_std)
        self.register_buffer("input_scale", (in_std / clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((in_mean - clip_mean) / clip_std).view(1, 3, 1, 1), persistent=False)
        self._pos_cache: dict[tuple, Tensor] = {}
        self._text_cache: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> CLIPTeacher:
        """Always eval mode, whatever ``mode`` says (frozen BatchNorm / dropout)."""
        return super().train(False)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """Empty: the teacher is rebuilt from its config and never written into a checkpoint."""
        return OrderedDict() if destination is None else destination

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # A parent's checkpoint has no teacher keys: supply the current weights so a strict load passes.
        for key, value in self.clip.state_dict(prefix=prefix + "clip.").items():
            state_dict.setdefault(key, value)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        """Embed images.

        Args:
            images: [B, 3, H, W] normalised with the student's ``input_mean``/``input_std``; any H, W
                (ViT: multiples of the patch size are used, the remainder is cropped by the patch conv).

        Returns:
            TeacherOutput with S [B, C] and D [B, C, h', w'] (h' = H / patch or H / output stride), both unit norm.
        """
        x = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        if isinstance(self.clip.visual, ModifiedResNet):
            cls, dense = self._encode_resnet(x)
        else:
            cls, dense = self._encode_vit(x)
        return TeacherOutput(cls=F.normalize(cls, dim=-1), dense=F.normalize(dense, dim=1))

    def _encode_vit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        visual = self.clip.visual
        x = visual.conv1(x)  # [B, W, h', w']
        batch, _, h, w = x.shape
        x = rearrange(x, "b c h w -> b (h w) c")
        x = torch.cat([visual.class_embedding.expand(batch, 1, -1).to(x.dtype), x], dim=1)  # [B, 1 + L, W]
        x = visual.ln_pre(x + self._pos_embed(visual.positional_embedding, (h, w), "bicubic").to(x.dtype))
        *blocks, last = visual.transformer.resblocks
        for block in blocks:
            x = block(x)
        pooled, tokens = visual._pool(last(x))
        if self.dense_mode == "value":
            width = x.shape[-1]
            attn = last.attn
            value = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
            tokens = visual.ln_post(attn.out_proj(value))[:, 1:]  # MaskCLIP: no q.k, no residual, no MLP
        dense = rearrange(tokens @ visual.proj, "b (h w) c -> b c h w", h=h, w=w)
        return pooled @ visual.proj, dense

    def _encode_resnet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        visual = self.clip.visual
        pool = visual.attnpool
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))  # [B, Cr, h', w']
        h, w = x.shape[-2:]
        feats = rearrange(x, "b c h w -> (h w) b c")  # [L, B, Cr]
        pos = self._pos_embed(pool.positional_embedding, (h, w), "bilinear").to(x.dtype)  # [1 + L, Cr]
        tokens = torch.cat([feats.mean(dim=0, keepdim=True), feats], dim=0) + pos[:, None]  # [1 + L, B, Cr]
        cls, _ = F.multi_head_attention_forward(  # open_clip's AttentionPool2d, class-token query only
            query=tokens[:1],
            key=tokens,
            value=tokens,
            embed_dim_to_check=tokens.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=False,
            need_weights=False,
        )
        located = tokens[1:] if self.dense_mode == "value" else feats
        dense = rearrange(pool.c_proj(pool.v_proj(located)), "(h w) b c -> b c h w", h=h, w=w)
        return cls[0], dense

    def _pos_embed(self, pos_embed: Tensor, grid: tuple[int, int], mode: str) -> Tensor:
        """[1 + g*g, W] -> [1 + h'*w', W], cached per grid (and per weights version / device)."""
        key = (grid, mode, pos_embed.data_ptr(), pos_embed._version)
        if key not in self._pos_cache:
            self._pos_cache[key] = resize_grid_pos_embed(pos_embed, grid, mode)
        return self._pos_cache[key]

    @torch.no_grad()
    def encode_text(self, class_names: Sequence[str]) -> Tensor:
        """Prompt-ensemble text classifier T.

        Per class, the normalised embeddings of all templates are averaged and renormalised. Results are cached in
        memory and, for loaded weights, on disk under ``cache_dir`` keyed by the weights, class names and templates.

        Args:
            class_names: N class names (underscores / hyphens become spaces in the prompts).

        Returns:
            T [N, C], unit norm, on the teacher's device.
        """
        key = self._text_key(class_names)
        if key not in self._text_cache:
            path = self.cache_dir / f"{key}.pt"
            if self.disk_cache and path.is_file():
                text = torch.load(path, map_location="cpu", weights_only=True)
            else:
                text = torch.stack([self._embed_class(name) for name in class_names]).cpu()
                if self.disk_cache:
                    atomic_save(text, path)  # atomic w.r.t. other processes
            self._text_cache[key] = text
        return self._text_cache[key].to(self.input_scale.device)

    def _embed_class(self, name: str) -> Tensor:
        tokens = self.tokenizer(class_prompts(name, self.templates)).to(self.input_scale.device)
        embeddings = F.normalize(self.clip.encode_text(tokens), dim=-1)  # [templates, C]
        return F.normalize(embeddings.mean(dim=0), dim=-1)

    def _text_key(self, class_names: Sequence[str]) -> str:
        blob = json.dumps([self.weights_id, list(class_names), list(self.templates)])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _file_stamp(path: str) -> list[int] | None:
    """(size, mtime) of a local file (``~`` and ``@assets/`` resolved), so a retrained checkpoint at the same path
    gets new cache keys."""
    path = resolve_path(path)
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def _check_vit(visual: VisionTransformer, model: str) -> None:
    last = visual.transformer.resblocks[-1]
    if visual.attn_pool is not None or not isinstance(last, ResidualAttentionBlock):
        raise ValueError(
            f"teacher.model={model!r}: dense tokens need a plain ViT (no attentional pooler, nn.MultiheadAttention "
            f"blocks); got last block {type(last).__name__}"
        )
    if not visual.transformer.batch_first:
        raise ValueError(f"teacher.model={model!r}: the ViT transformer must be batch_first")
