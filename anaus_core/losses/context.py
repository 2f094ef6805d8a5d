"""Contextual prediction loss L_ctx at one scale (paper sec. 2.3).

The online encoder sees the damaged core crop, the target encoder the intact one; at every
scale the online feature map is regressed onto the target feature map:

    L_ctx,s = mean over valid images b and grid cells (i, j) of || n(f_hat[b,:,i,j]) - n(f[b,:,i,j]) ||^2

with ``n`` the L2 normalisation over channels at each location (so each term is
``2 - 2 cos`` in [0, 4], the BYOL regression loss applied per location). Normalising keeps the
four scales (C5 has 512 channels, FPN levels 256, different magnitudes) on one footing and
stops the trivial solution of shrinking feature norms; the paper's ||t_hat - t||^2 does not say
whether features are normalised. The official code instead compared mask-pooled projections;
this follows the paper (encoder features, no projector/predictor).

Scan region (issue 10): with ``cell_weights`` — the fraction of each cell inside the sample's
scan region, the core's region cut pooled to the feature grid as the masks are — each image's
term is the weighted mean over its cells,

    L_ctx,s(b) = sum_ij w[b,i,j] d[b,i,j] / sum_ij w[b,i,j],

so a cell wholly in the black frame around a sector does not count, and a cell on the fan edge
counts by its coverage. An image whose weights sum to zero counts as invalid. Images are then
averaged with equal weight, as without a region (where every cell weighs 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def context_prediction_loss(online_features: Tensor, target_features: Tensor, valid: Tensor | None = None,
                            cell_weights: Tensor | None = None) -> Tensor:
    """Per-location normalised MSE between (B, C, h, w) maps; ``valid`` bool (B,) selects images;
    ``cell_weights`` (B, h, w) or (B, 1, h, w), >= 0, weighs each cell (None: all cells equal).

    Returns a float32 scalar; 0 (still attached to the graph) when no image is valid. No gradient
    flows into ``target_features``.
    """
    if online_features.shape != target_features.shape:
        raise ValueError(
            f"context_prediction_loss: shapes differ {tuple(online_features.shape)} vs {tuple(target_features.shape)}"
        )
    with torch.autocast(device_type=online_features.device.type, enabled=False):
        online = F.normalize(online_features.float(), dim=1)
        target = F.normalize(target_features.detach().float(), dim=1)
        per_cell = (online - target).pow(2).sum(dim=1)  # (B, h, w)
        if cell_weights is None:
            per_image = per_cell.mean(dim=(1, 2))  # (B,)
            weights = valid.float() if valid is not None else None
        else:
            cell_weights = cell_weights.float().reshape(per_cell.shape).detach()
            mass = cell_weights.sum(dim=(1, 2))
            per_image = (per_cell * cell_weights).sum(dim=(1, 2)) / mass.clamp_min(1e-12)
            weights = (mass > 0).float() if valid is None else (mass > 0).float() * valid.float()
        if weights is None:
            return per_image.mean()
        return (per_image * weights).sum() / weights.sum().clamp_min(1.0)
