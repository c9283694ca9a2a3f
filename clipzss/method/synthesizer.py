"""Pseudo-weight generation (docs/pages/method.md, PLM part 2): region centroids attend to the teacher's tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Synthesizer(nn.Module):
    """A pre-norm transformer decoder turning region centroids into class prototypes.

    Queries are the region centroids p_l (the teacher's dense-token means by default); keys and
    values are the image's teacher CLS token and, with ``dense_memory``, its dense tokens - restricted to each
    query's own region when a ``region_mask`` is given. There is no final LayerNorm: the residual stream keeps each
    prototype in the centroid's CLIP-space direction at initialisation, and the output is only L2-normalised.
    No dropout.

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
        self.heads = heads
        self.dense_memory = dense_memory

    def forward(
        self,
        queries: Tensor,
        valid: Tensor,
        cls: Tensor,
        dense: Tensor | None = None,
        region_mask: Tensor | None = None,
    ) -> Tensor:
        """Prototypes for the valid queries.

        Args:
            queries: [B, Q, C] region centroids (padded).
            valid: [B, Q] bool, False on padding queries (excluded as keys of the self-attention).
            cls: [B, C] teacher CLS.
            dense: [B, C, h', w'] teacher dense tokens; required when ``dense_memory``.
            region_mask: [B, Q, h'w'] bool, True where a dense token lies in the query's region; with
                ``dense_memory``, a query attends to the CLS and its own region's tokens only (None: to all tokens).

        Returns:
            [B, Q, C] L2-normalised prototypes (padding rows are computed but meaningless).
        """
        memory = cls[:, None]  # [B, 1, C]
        memory_mask = None
        if self.dense_memory:
            if dense is None:
                raise ValueError("Synthesizer: dense_memory=True (plm.synthesizer.dense_memory) needs dense tokens")
            memory = torch.cat([memory, rearrange(dense, "b c h w -> b (h w) c")], dim=1)  # [B, 1 + h'w', C]
            if region_mask is not None:
                allowed = F.pad(region_mask, (1, 0), value=True)  # [B, Q, 1 + h'w'], the CLS always visible
                memory_mask = ~allowed.repeat_interleave(self.heads, dim=0)  # [B * heads, Q, 1 + h'w'], True = hidden
        padding = ~valid
        padding = padding & valid.any(1, keepdim=True)  # an image without queries masks nothing (no NaN rows)
        out = self.decoder(queries, memory, memory_mask=memory_mask, tgt_key_padding_mask=padding)
        return F.normalize(out, dim=-1)
