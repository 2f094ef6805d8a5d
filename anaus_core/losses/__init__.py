"""AnaUS losses: one concept per module, pure functions of tensors."""

from anaus_core.losses.anatomy_contrast import anatomy_contrastive_loss, gather_across_ranks
from anaus_core.losses.byol import byol_regression_loss, symmetric_byol_loss
from anaus_core.losses.context import context_prediction_loss
from anaus_core.losses.mask_pooling import DEFAULT_MIN_MASK_AREA, downsample_masks, mask_pool

__all__ = [
    "DEFAULT_MIN_MASK_AREA",
    "anatomy_contrastive_loss",
    "byol_regression_loss",
    "context_prediction_loss",
    "downsample_masks",
    "gather_across_ranks",
    "mask_pool",
    "symmetric_byol_loss",
]
