"""Paired two-sided Wilcoxon signed-rank test between two encoders' scores on the same units
(folds, or images)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import wilcoxon


def paired_wilcoxon(first: np.ndarray, second: np.ndarray) -> dict:
    """``{"n", "median_difference", "p_value"}`` (first - second). ``p_value`` is NaN with fewer than
    two pairs and 1.0 when every difference is zero (scipy refuses that case)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    diff = a - b
    result = {"n": int(diff.size), "median_difference": float(np.median(diff)) if diff.size else math.nan}
    if diff.size < 2:
        result["p_value"] = math.nan
    elif not np.any(diff != 0):
        result["p_value"] = 1.0
    else:
        result["p_value"] = float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    return result
