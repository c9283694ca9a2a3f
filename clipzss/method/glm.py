"""Global Learning Module (docs/pages/method.md, GLM): CLS-query attention pooling, InfoNCE against the teacher CLS."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_pool(S: Tensor, R: Tensor, tau: float = 0.0) -> Tensor:
    """Pool the student's dense features with the teacher CLS as query (no parameters).

    W = softmax_L(S . R / tau), S_hat = sum_L W R. The paper scales by 1 / sqrt(C) (``tau=0`` keeps it): on unit
    vectors S . R lies in [-1, 1], so that softmax is nearly uniform and S_hat close to the mean of R; a CLIP-like
    temperature (``glm.attn_tau`` = 0.07) lets the attention localise (docs/pages/method.md, GLM).

    Args:
        S: [B, C] teacher CLS embeddings.
        R: [B, C, h, w] student dense features.
        tau: attention temperature; 0 = sqrt(C).

    Returns:
        [B, C] the predicted CLS S_hat (not normalised).
    """
    R = R.flatten(2)  # [B, C, L]
    temperature = tau if tau > 0 else math.sqrt(R.shape[1])
    weights = torch.softmax(torch.einsum("bc,bcl->bl", S, R) / temperature, dim=-1)  # [B, L]
    return torch.einsum("bl,bcl->bc", weights, R)


class GlobalLoss(nn.Module):
    """InfoNCE between the predicted CLS S_hat and the teacher CLS S, with a FIFO bank of past S as negatives.

    L = -mean_i log exp(s_i.s_hat_i / tau) / (exp(s_i.s_hat_i / tau) + sum_{j != i} exp(s_j.s_hat_i / tau)
    + sum_{v in V} exp(v.s_hat_i / tau)), with j over the teacher CLS of the whole (gathered) batch. Each process
    computes it for its own rows i; gradients averaged over processes give the loss of the whole batch.

    After the loss, in training mode, the gathered S is pushed into the bank (identical on every process, since
    every process pushes the same gathered batch). A bank not yet full uses only its filled rows.

    Args:
        embed_dim: C.
        tau: temperature (0.07).
        bank_size: |V|, rows of the FIFO bank (0 = no bank).
    """

    def __init__(self, embed_dim: int, tau: float, bank_size: int) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"GlobalLoss: glm.tau must be > 0, got {tau}")
        self.tau = tau
        self.register_buffer("bank", torch.zeros(bank_size, embed_dim))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))

    def forward(self, S_hat_local: Tensor, S_local: Tensor, S_all: Tensor, rank_offset: int) -> Tensor:
        """InfoNCE for this process's rows.

        Args:
            S_hat_local: [B, C] predicted CLS of this process's images (normalised here).
            S_local: [B, C] their teacher CLS (normalised), the positives.
            S_all: [G, C] teacher CLS gathered from all processes; rows rank_offset..rank_offset+B-1 are S_local.
            rank_offset: index of this process's first row in S_all.

        Returns:
            Scalar loss, mean over this process's B rows.
        """
        s_hat = F.normalize(S_hat_local, dim=-1)
        B = s_hat.shape[0]
        positive = (s_hat * S_local).sum(-1, keepdim=True)  # [B, 1]
        batch = s_hat @ S_all.t()  # [B, G]
        own = torch.arange(B, device=s_hat.device) + rank_offset
        batch = batch.scatter(1, own[:, None], float("-inf"))  # the positive is counted once, in column 0
        bank = self.bank.clone().to(s_hat.dtype)  # a copy: autograd keeps it while the bank is updated below
        filled = torch.arange(bank.shape[0], device=bank.device) < self.bank_filled  # no host sync
        queued = (s_hat @ bank.t()).masked_fill(~filled, float("-inf"))  # [B, |V|]
        logits = torch.cat([positive, batch, queued], dim=1) / self.tau  # [B, 1 + G + |V|]
        loss = -torch.log_softmax(logits, dim=1)[:, 0].mean()
        if self.training:
            self._enqueue(S_all.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, S_all: Tensor) -> None:
        """Push [G, C] into the ring buffer (only the last bank_size rows if G is larger)."""
        size = self.bank.shape[0]
        if size == 0:
            return
        S_all = S_all[-size:]
        rows = (self.bank_ptr + torch.arange(S_all.shape[0], device=self.bank.device)) % size
        self.bank[rows] = S_all.to(self.bank.dtype)
        self.bank_ptr.copy_((self.bank_ptr + S_all.shape[0]) % size)
        self.bank_filled.clamp_(max=size - S_all.shape[0]).add_(S_all.shape[0])


def glm_projection(embed_dim: int) -> nn.Linear:
    """The GLM's own linear map on the pooled feature (``glm.projection="linear"``), started at the identity.

    InfoNCE then matches W S_hat + b, not S_hat, to the teacher CLS: the CLS embedding lives in CLIP's image cone,
    away from the text embeddings the dense features are trained towards (CLIP's modality gap), and the map lets
    the GLM take what is image-specific from R without pulling R's mean into that cone.

    Args:
        embed_dim: C.

    Returns:
        A C -> C ``nn.Linear``: weight = identity, bias = 0 (at step 0 the loss equals the plain GLM's).
    """
    proj = nn.Linear(embed_dim, embed_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(embed_dim))
        proj.bias.zero_()
    return proj
