"""The CLIP-ZSS objective: every loss term of docs/pages/method.md in one module, returning ``(losses, report)``.

L = w_g L_global + w_nel L_nel(x, F) + w_ce CE(x, F) + w_bce L_text, with training logits
x = cat(alpha R^T T_seen, beta cos(R, P_pseudo)). A module is built only when its term is enabled. Under
``plm.loss_norm="separate"`` (the default) CE and NEL are each the seen-label part (averaged over its own
pixels / classes) plus ``plm.potential_weight`` times the potential-label part (averaged over its own).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipzss.config import Config
from clipzss.data.transforms import PAD_INDEX
from clipzss.distributed import gather_with_grad, world_info
from clipzss.method.glm import GlobalLoss, attention_pool, glm_projection
from clipzss.method.nel import NonMutuallyExclusiveLoss
from clipzss.method.plm import PixelLearning
from clipzss.method.pseudo_labels import IGNORE_INDEX

if TYPE_CHECKING:
    from clipzss.models.teacher import TeacherOutput

NEL_PRIOR = 0.01  # plm.nel_learnable_bias starts at the focal-loss prior logit (Lin et al., RetinaNet, 2017)


class KMeansScaleError(ValueError):
    """A K-Means window (``plm.kmeans.scales``) is larger than the teacher's token grid."""


def check_kmeans_scales(scales: Sequence[int], grid: tuple[int, int]) -> None:
    """Refuse windows larger than the teacher's token grid; warn about windows that give the image mean only.

    With window and stride s and ``ceil_mode`` pooling, K_s = ceil(h / s) * ceil(w / s): every s >= max(h, w) is one
    seed and so one centroid, the mean of the image's tokens. A window above the grid cannot be what was meant
    (crop size and teacher stride decide the grid), so it is an error; a window equal to it is a legitimate
    whole-image cluster, only worth a warning.

    Args:
        scales: window sizes in tokens (``plm.kmeans.scales``).
        grid: (h, w) of the teacher's dense tokens for a training crop.

    Raises:
        KMeansScaleError: some scale is larger than max(h, w).
    """
    h, w = grid
    side = max(h, w)
    where = f"the teacher's token grid of a training crop is {h}x{w}"
    too_large = [s for s in scales if s > side]
    if too_large:
        raise KMeansScaleError(
            f"plm.kmeans.scales: {too_large} exceed {where}; a window is at most {side} tokens (any window >= {side} "
            f"is one centroid, the image mean). Use windows below {side}, or a larger data.crop_size."
        )
    collapsed = [s for s in scales if s == side]
    if collapsed:
        warnings.warn(
            f"plm.kmeans.scales: {collapsed} span {where}: one centroid per image (the image mean), so "
            f"{'this scale adds' if len(collapsed) == 1 else 'these scales add'} at most one whole-image cluster.",
            stacklevel=3,
        )


def seen_logits(R: Tensor, text: Tensor, alpha: Tensor | float) -> Tensor:
    """Class logits alpha * cos(R, T), used for training (seen classes) and inference (any vocabulary).

    Args:
        R: [B, C, h, w] student features.
        text: [N, C] class text embeddings.
        alpha: logit scale.

    Returns:
        [B, N, h, w].
    """
    return alpha * torch.einsum("bchw,nc->bnhw", F.normalize(R, dim=1), F.normalize(text, dim=-1))


class CLIPZSSObjective(nn.Module):
    """Student features + frozen-teacher outputs + seen labels -> named loss terms and logged scalars.

    Args:
        cfg: the whole config (reads ``glm``, ``plm`` and ``loss``).
        seen_text: [Ns, C] seen-class text embeddings (normalised here; a non-persistent buffer).
    """

    def __init__(self, cfg: Config, seen_text: Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        embed_dim = seen_text.shape[1]
        self.register_buffer("seen_text", F.normalize(seen_text.detach().float(), dim=-1), persistent=False)
        self.glm = GlobalLoss(embed_dim, cfg.glm.tau, cfg.glm.bank_size) if cfg.glm.weight > 0 else None
        if self.glm is not None and cfg.glm.projection == "linear":
            self.glm_proj = glm_projection(embed_dim)
        self.plm = PixelLearning(cfg.plm, embed_dim) if cfg.plm.enabled else None
        self.nel = NonMutuallyExclusiveLoss() if cfg.plm.nel_weight > 0 else None
        if self.nel is not None and cfg.plm.nel_learnable_bias:
            self.nel_bias = nn.Parameter(torch.tensor(-math.log((1 - NEL_PRIOR) / NEL_PRIOR)))
        if cfg.loss.learnable_scale:
            self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.loss.alpha)))
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.loss.beta)))
        self._checked_grids: set[tuple[int, int]] = set()

    @property
    def needs_teacher(self) -> bool:
        """False when neither GLM nor PLM is enabled: the baseline trains without running CLIP."""
        return self.glm is not None or self.plm is not None

    def scales(self) -> tuple[Tensor, Tensor]:
        """(alpha, beta): learnt (exp of log-parameters) or the configured constants."""
        if self.cfg.loss.learnable_scale:
            return self.log_alpha.exp(), self.log_beta.exp()
        device = self.seen_text.device
        return torch.tensor(self.cfg.loss.alpha, device=device), torch.tensor(self.cfg.loss.beta, device=device)

    def inference_alpha(self) -> float:
        """alpha as a plain number: the logit scale evaluation and the exported student use."""
        return float(self.scales()[0].detach())

    def forward(
        self,
        R: Tensor,
        teacher: TeacherOutput | None,
        labels: Tensor,
        gather: Callable[[Tensor], Tensor] = gather_with_grad,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """All enabled loss terms.

        Args:
            R: [B, C, h, w] student features.
            teacher: .cls [B, C] and .dense [B, C, h', w'] (normalised), from the frozen teacher under no_grad;
                may be None only when ``needs_teacher`` is False.
            labels: [B, H, W] long, seen class ids 0..Ns-1, 255 (ignore) or PAD_INDEX (crop padding: ignored, and
                never a potential class).
            gather: all-gathers [B, C] along dim 0 over processes (identity on one process). Every process must
                hold the same B: this process's rows are taken to start at rank * B of the gathered tensor.

        Returns:
            (losses, report): losses holds "glm", "nel", "ce", "bce" (enabled terms only; "bce" is the synthesizer's
            text loss) and "total" (their weighted sum, the one to backpropagate); report holds detached scalars
            that are logged, never summed.
        """
        if teacher is None and self.needs_teacher:
            raise ValueError("CLIPZSSObjective: teacher outputs are required when glm.weight > 0 or plm.enabled")
        cfg = self.cfg
        pad = labels == PAD_INDEX
        labels = labels.masked_fill(pad, IGNORE_INDEX)
        alpha, beta = self.scales()
        losses: dict[str, Tensor] = {}
        report: dict[str, Tensor] = {"scale/alpha": alpha.detach(), "scale/beta": beta.detach()}
        if self.nel is not None and cfg.plm.nel_learnable_bias:
            report["scale/nel_bias"] = self.nel_bias.detach()
        if self.glm is not None:
            S = teacher.cls
            rank, _ = world_info()
            S_hat = attention_pool(S, R, cfg.glm.attn_tau)  # [B, C]
            if cfg.glm.projection == "linear":
                S_hat = self.glm_proj(S_hat)
            losses["glm"] = self.glm(S_hat, S, gather(S), rank * S.shape[0])

        x = seen_logits(R, self.seen_text.to(R.dtype), alpha)  # [B, Ns, h, w]
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # [B, N]
        target = labels
        if self.plm is not None:
            grid = tuple(teacher.dense.shape[-2:])
            if grid not in self._checked_grids:  # once per grid: crops share one size, so in practice once per run
                check_kmeans_scales(cfg.plm.kmeans.scales, grid)
                self._checked_grids.add(grid)
            out = self.plm(R, teacher, labels, self.seen_text.to(R.dtype), alpha, beta, pad)
            x = torch.cat([x, out.potential_logits], dim=1)  # [B, Ns + Kp, h, w]
            valid = torch.cat([valid, out.potential_valid], dim=1)
            target = out.labels
            report.update(out.report)
            if out.text_loss is not None and cfg.plm.bce_weight > 0:
                losses["bce"] = out.text_loss
        x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=False)  # [B, N, H, W]
        losses.update(self._pixel_losses(x, target, valid))

        weights = {"glm": cfg.glm.weight, "nel": cfg.plm.nel_weight, "ce": cfg.plm.ce_weight, "bce": cfg.plm.bce_weight}
        losses["total"] = sum((weights[name] * value for name, value in losses.items()), R.new_zeros(()))
        return losses, report

    def _pixel_losses(self, x: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """NEL and CE of the logits x [B, N, H, W] (N = Ns + Kp) against F [B, H, W], channels valid [B, N].

        "joint": one average over every labelled pixel (NEL: every present class). "separate": seen and potential
        parts averaged apart, then seen + potential_weight * potential.
        """
        cfg, num_seen = self.cfg.plm, self.seen_text.shape[0]
        separate = cfg.loss_norm == "separate"
        losses: dict[str, Tensor] = {}
        if self.nel is not None:
            z = x + self.nel_bias if cfg.nel_learnable_bias else x  # NEL's sigmoid only (softmax CE is shift-free)
            if separate:
                is_seen = torch.arange(x.shape[1], device=x.device) < num_seen  # [N]
                losses["nel"] = self.nel(z, target, valid & is_seen) + cfg.potential_weight * self.nel(
                    z, target, valid & ~is_seen
                )
            else:
                losses["nel"] = self.nel(z, target, valid)
        if cfg.ce_weight > 0:
            masked = x.float().masked_fill(~valid[:, :, None, None], float("-inf"))  # padded channels never win
            ce = F.cross_entropy(masked, target, ignore_index=IGNORE_INDEX, reduction="none")  # [B, H, W], 0 on 255
            if separate:
                seen = target < num_seen
                potential = (target >= num_seen) & (target != IGNORE_INDEX)
                losses["ce"] = (ce * seen).sum() / seen.sum().clamp_min(1) + cfg.potential_weight * (
                    ce * potential
                ).sum() / potential.sum().clamp_min(1)
            else:
                losses["ce"] = ce.sum() / (target != IGNORE_INDEX).sum().clamp_min(1)
        return losses

    @torch.no_grad()
    def pseudo_labels(self, teacher: TeacherOutput, labels: Tensor) -> Tensor:
        """The fused labels F [B, H, W] (for visualisation and tests); the labels themselves when PLM is off."""
        pad = labels == PAD_INDEX
        labels = labels.masked_fill(pad, IGNORE_INDEX)
        if self.plm is None:
            return labels
        return self.plm.pseudo_labels(teacher.dense, labels, self.seen_text.shape[0], pad)[0]
