"""Pseudo-weight generation (METHOD.md, PLM part 2): region centroids attend to the teacher's image tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Synthesizer(nn.Module):
    """A pre-norm transformer decoder turning region centroids into class prototypes.

    Queries are the region centroids p_l; keys/values are the image's teacher CLS token (and, with
    ``dense_memory``, its dense tokens). There is no final LayerNorm: the residual stream keeps each prototype in
    the centroid's CLIP-space direction at initialisation, and the output is only L2-normalised. No dropout.

    Args:
        embed_dim: C.
        layers: decoder layers.
        heads: attention heads (must divide C).
        dense_memory: also attend to the teacher's dense tokens.
    """

    def __init__(self, embed_dim: int, layers: int, heads: int, dense_memory: bool) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"Synthesizer: plm.synthesizer.heads={heads} must divide the embed dim {embed_dim}")
        layer = nn.TransformerDecoderLayer(
            embed_dim, heads, dim_feedforward=4 * embed_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.dense_memory = dense_memory

    def forward(self, queries: Tensor, valid: Tensor, cls: Tensor, dense: Tensor | None = None) -> Tensor:
        """Prototypes for the valid queries.

        Args:
            queries: [B, Q, C] region centroids (padded).
            valid: [B, Q] bool, False on padding queries (excluded as keys of the self-attention).
            cls: [B, C] teacher CLS.
            dense: [B, C, h', w'] teacher dense tokens; required when ``dense_memory``.

        Returns:
            [B, Q, C] L2-normalised prototypes (padding rows are computed but meaningless).
        """
        memory = cls[:, None]  # [B, 1, C]
        if self.dense_memory:
            if dense is None:
                raise ValueError("Synthesizer: dense_memory=True (plm.synthesizer.dense_memory) needs dense tokens")
            memory = torch.cat([memory, rearrange(dense, "b c h w -> b (h w) c")], dim=1)  # [B, 1 + h'w', C]
        padding = ~valid
        padding = padding & valid.any(1, keepdim=True)  # an image without queries masks nothing (no NaN rows)
        out = self.decoder(queries, memory, tgt_key_padding_mask=padding)
        return F.normalize(out, dim=-1)
