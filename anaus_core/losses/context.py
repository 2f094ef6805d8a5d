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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def context_prediction_loss(online_features: Tensor, target_features: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-location normalised MSE between (B, C, h, w) maps; ``valid`` bool (B,) selects images.

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
        per_image = (online - target).pow(2).sum(dim=1).mean(dim=(1, 2))  # (B,)
        if valid is None:
            return per_image.mean()
        weights = valid.float()
        return (per_image * weights).sum() / weights.sum().clamp_min(1.0)
