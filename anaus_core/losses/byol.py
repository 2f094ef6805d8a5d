"""BYOL regression loss for the whole-image baseline (``objective="byol"``).

``2 - 2 cos(q, z')`` between an online prediction and the target projection of the other view,
mean over the batch; the symmetric form adds the view-swapped term (BYOL, lightly
``NegativeCosineSimilarity`` up to the 2 - 2x affine map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def byol_regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean of ``2 - 2 cos`` over rows of (N, D) tensors; float32; no gradient into ``target``."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        cosine = F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)
        return (2.0 - 2.0 * cosine).mean()


def symmetric_byol_loss(
    pred1: Tensor, pred2: Tensor, target1: Tensor, target2: Tensor, *, symmetric: bool = True
) -> Tensor:
    """``L(q1, z2') + L(q2, z1')``; ``symmetric=False`` keeps only the first term."""
    loss = byol_regression_loss(pred1, target2)
    if symmetric:
        loss = loss + byol_regression_loss(pred2, target1)
    return loss
