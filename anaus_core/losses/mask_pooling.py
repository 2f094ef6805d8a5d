"""Mask pooling (paper eq. 4): area-weighted mean of a feature map inside each mask.

``h_s = sum_ij m_s[i,j] f_s[i,j] / sum_ij m_s[i,j]`` where ``m_s`` is the binary mask reduced to the
feature grid by adaptive average pooling, i.e. each cell holds the *fraction* of its area that the
mask covers (paper A.1). Unlike DeepMind/official DetCon there is no argmax to a hard one-hot
assignment: overlapping masks (SAM proposals may overlap) keep their own soft weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: a mask whose pooled area (in feature cells) is at or below this is empty at that scale
DEFAULT_MIN_MASK_AREA = 1e-3


def downsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, H, W) float masks in {0, 1} -> (B, K, h, w) area fractions of each grid cell."""
    size = tuple(int(v) for v in size)
    if tuple(masks.shape[-2:]) == size:
        return masks.float()
    return F.adaptive_avg_pool2d(masks.float(), size)


def mask_pool(
    features: Tensor,
    cell_masks: Tensor,
    *,
    min_area: float = DEFAULT_MIN_MASK_AREA,
) -> tuple[Tensor, Tensor]:
    """Pool ``features`` (B, C, h, w) under ``cell_masks`` (B, K, h, w) -> (pooled (B, K, C), valid (B, K)).

    Computed in float32. ``valid[b, k]`` is False when the mask covers at most ``min_area`` cells
    at this scale; its pooled vector is then zero and must not be used.
    """
    if features.shape[0] != cell_masks.shape[0] or features.shape[-2:] != cell_masks.shape[-2:]:
        raise ValueError(
            f"mask_pool: features {tuple(features.shape)} and masks {tuple(cell_masks.shape)} do not match"
        )
    with torch.autocast(device_type=features.device.type, enabled=False):
        cell_masks = cell_masks.float()
        area = cell_masks.sum(dim=(2, 3))
        valid = area > min_area
        weighted = torch.einsum("bkhw,bchw->bkc", cell_masks, features.float())
        pooled = weighted / area.clamp_min(min_area).unsqueeze(-1)
        pooled = pooled * valid.unsqueeze(-1)
    return pooled, valid
