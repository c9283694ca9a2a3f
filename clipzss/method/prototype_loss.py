"""The synthesizer's text loss: each seen prototype P_k must land on its own class text T_k (docs/pages/method.md).

The paper's L_bce (sigmoid(scale P T^T) against one-hot, no bias) has its optimum far from P = T_k: with
scale 14.3 the best cos(P_k, T_k) is about 0.18. The other kinds have their optimum at (or towards) the text:
    cosine   1 - cos(P_k, T_k)
    softmax  cross-entropy of scale P_k T^T over the seen texts, target k
    sigmoid  sigmoid(scale P T^T + b) against one-hot, with a learnable bias b (SigLIP-style)
    bce      the paper's bias-free sigmoid (kept for the ablation)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("cosine", "softmax", "sigmoid", "bce")


class PrototypeTextLoss(nn.Module):
    """Seen prototypes against the seen texts, averaged over the prototypes present.

    Args:
        kind: one of ``KINDS`` (``plm.synthesizer.loss``).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"plm.synthesizer.loss: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.kind = kind
        self.bias = nn.Parameter(torch.tensor(-10.0)) if kind == "sigmoid" else None  # SigLIP init

    def forward(self, prototypes: Tensor, present: Tensor, seen_text: Tensor, scale: Tensor) -> Tensor:
        """Loss of the present seen prototypes.

        Args:
            prototypes: [B, Ns, C] normalised seen prototypes (row k = class k's region; absent rows are ignored).
            present: [B, Ns] bool, the classes with a region in the image.
            seen_text: [Ns, C] normalised seen-class texts.
            scale: logit scale (alpha) for the softmax and sigmoid kinds.

        Returns:
            Scalar, mean over present prototypes (0, attached, if none is present).
        """
        Ns = seen_text.shape[0]
        logits = prototypes @ seen_text.t()  # [B, Ns, Ns] cosines
        if self.kind == "cosine":
            loss = 1 - logits.diagonal(dim1=1, dim2=2)  # [B, Ns]
        elif self.kind == "softmax":
            target = torch.arange(Ns, device=logits.device).expand(logits.shape[0], Ns)
            loss = F.cross_entropy((scale * logits).transpose(1, 2), target, reduction="none")  # [B, Ns]
        else:
            shifted = scale * logits + (self.bias if self.bias is not None else 0.0)
            target = torch.eye(Ns, device=logits.device, dtype=logits.dtype).expand_as(logits)
            loss = F.binary_cross_entropy_with_logits(shifted, target, reduction="none").mean(-1)  # [B, Ns]
        return (loss * present).sum() / present.sum().clamp_min(1)
