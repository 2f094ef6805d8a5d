"""Mask-id sampling: K ids per image, drawn with probability proportional to area (paper A.1).

The same K ids are used by both views and both branches (online/target), so the positive pair of
sampled slot ``k`` is "the same mask id in the other view". Sampling is **with replacement** from
the categorical distribution over the masks present, as the paper ("K masks are drawn from the
resulting categorical distribution") and DetCon do; an image with fewer than K masks therefore
repeats ids, and the loss must treat equal (image, id) pairs as the same instance (never as
negatives of each other) — ``mask_ids`` carries what it needs for that.

"Present" means at least ``ViewConfig.min_view_area`` view pixels in BOTH views
(``mask_presence="both"``, the default: every slot has a positive), or non-empty in at least one
view (``"either"``, DetCon's draw); the weight of a present mask is its total area in both views,
measured in view pixels (area inside the crop × S² / crop area). The batch draw
(``draws.draw_batch``) applies the rule; these per-sample helpers are its reference.
"""

from __future__ import annotations

import numpy as np


def area_weights(areas_view1: np.ndarray, areas_view2: np.ndarray) -> np.ndarray:
    """Sampling weight of each mask: its summed area in both views (float64, (M,))."""
    return np.asarray(areas_view1, dtype=np.float64) + np.asarray(areas_view2, dtype=np.float64)


def sample_mask_indices(weights: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``num_samples`` indices into ``weights`` drawn with replacement, P(i) ∝ weights[i].

    Returns int64 (num_samples,); an empty array when no weight is positive (no mask present).
    """
    weights = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    if weights.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Inverse-CDF draw: identical to rng.choice(p=...) in distribution, without its O(M) checks
    # (this runs once per sample in the workers).
    cdf = np.cumsum(weights)
    total = cdf[-1]
    if not np.isfinite(total) or total <= 0:
        return np.zeros(0, dtype=np.int64)
    draws = rng.random(num_samples) * total
    # Rounding can put a draw at or past cdf[-1]; clamp to the last mask that has weight.
    last_present = weights.size - 1 - int(np.argmax(weights[::-1] > 0))
    return np.minimum(np.searchsorted(cdf, draws, side="right"), last_present).astype(np.int64)
