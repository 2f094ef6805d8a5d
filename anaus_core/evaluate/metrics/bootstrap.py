"""Percentile bootstrap confidence interval of a statistic over N items (seeded)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float], count: int, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """(low, high) percentile interval of ``statistic(indices)`` over ``resamples`` resamplings of
    ``range(count)`` with replacement. Resamples where the statistic is undefined (NaN, e.g. an
    AUROC on a single class) are dropped; (NaN, NaN) when none is defined."""
    if count < 2 or resamples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        value = statistic(rng.integers(0, count, size=count))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))
