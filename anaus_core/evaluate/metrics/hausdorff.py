"""Hausdorff distance (HD) and its 95th percentile (HD95) between the boundaries of two binary masks.

Computed with MONAI's ``compute_hausdorff_distance`` (boundary = mask minus its erosion, exact
Euclidean distances, symmetric: the larger of the two directed values; HD95 takes the 95th
percentile of each directed set of boundary distances, then the larger one). Units: pixels, or
millimetres when ``spacing`` (row, column) in mm is given. Unlike the official AnaUS script
(image rows as points) and torchmetrics (wrong on non-square images) these are boundary-point
distances; a test holds them against ``scipy.spatial.distance.directed_hausdorff``.

Empty-mask policy (MONAI returns NaN/inf, which a later mean would skip or blow up on):
both empty -> 0; exactly one empty -> the image diagonal (the largest distance the image can
hold), a stated failure value that counts in every mean.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def empty_mask_distance(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The failure value for an empty prediction (or ground truth) on the other's non-empty mask."""
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    return math.hypot(shape[0] * sy, shape[1] * sx)


def hausdorff_distances(prediction: np.ndarray, target: np.ndarray, *, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Binary masks (H, W) -> ``{"hd": ..., "hd95": ...}`` (pixels, or mm with ``spacing``)."""
    pred = np.asarray(prediction, dtype=bool)
    gt = np.asarray(target, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and target {gt.shape} differ in size")
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return {"hd": 0.0, "hd95": 0.0}
    if pred_empty or gt_empty:
        value = empty_mask_distance(pred.shape, spacing)
        return {"hd": value, "hd95": value}
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    kwargs = {"include_background": True, "spacing": None if spacing is None else [float(s) for s in spacing]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = float(compute_hausdorff_distance(y_pred, y, **kwargs).item())
        hd95 = float(compute_hausdorff_distance(y_pred, y, percentile=95, **kwargs).item())
    return {"hd": hd, "hd95": hd95}
