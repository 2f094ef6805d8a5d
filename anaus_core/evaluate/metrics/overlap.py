"""Dice, PPV (precision) and sensitivity (recall) of one binary prediction against its ground truth.

Computed with MONAI (``compute_dice`` and its confusion-matrix metrics); MONAI returns NaN for
0/0 ratios, and a NaN that is later skipped flatters a mean, so the empty-mask policy is set
here, deliberately (see ``docs/evaluate.md``):

==========================  =====  =====  ===========
case                         Dice   PPV    sensitivity
==========================  =====  =====  ===========
both empty                   1      1      1
prediction empty, GT not     0      0      0
GT empty, prediction not     0      0      1 (nothing to miss; the false alarm costs Dice and PPV)
==========================  =====  =====  ===========
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_dice, get_confusion_matrix


def overlap_metrics(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Binary masks (H, W) -> ``{"dice", "ppv", "sensitivity"}`` with the policy above."""
    pred = torch.as_tensor(np.asarray(prediction, dtype=bool), dtype=torch.float32)[None, None]
    gt = torch.as_tensor(np.asarray(target, dtype=bool), dtype=torch.float32)[None, None]
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape[2:])} and target {tuple(gt.shape[2:])} differ in size")
    pred_empty, gt_empty = not bool(pred.any()), not bool(gt.any())
    # ignore_empty=False: MONAI scores "both empty" as 1 and "GT empty, prediction not" as 0.
    dice = float(compute_dice(pred, gt, include_background=True, ignore_empty=False).item())
    confusion = get_confusion_matrix(pred, gt, include_background=True)
    ppv = float(compute_confusion_matrix_metric("precision", confusion).item())
    sensitivity = float(compute_confusion_matrix_metric("sensitivity", confusion).item())
    if pred_empty:
        ppv = 1.0 if gt_empty else 0.0
    if gt_empty:
        sensitivity = 1.0
    return {"dice": dice, "ppv": ppv, "sensitivity": sensitivity}
