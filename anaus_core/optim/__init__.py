"""Optimisation: LARS with norm/bias exclusion, cosine lr with warm-up, cosine EMA momentum."""

from anaus_core.optim.lars import LARS, NORM_LAYER_TYPES, build_lars, param_groups_excluding_norm_and_bias
from anaus_core.optim.schedules import cosine_momentum, cosine_schedule_with_warmup, scaled_lr

__all__ = [
    "LARS",
    "NORM_LAYER_TYPES",
    "build_lars",
    "cosine_momentum",
    "cosine_schedule_with_warmup",
    "param_groups_excluding_norm_and_bias",
    "scaled_lr",
]
