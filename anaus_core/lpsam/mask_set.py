"""From LP-SAM outputs to the mask set of one image (docs/lpsam.md, "The mask set of an image").

1. Class masks: for each class k, pixels with probability > ``threshold``, split into
   8-connected components (``scipy.ndimage.label``); components below ``min_area`` pixels are
   dropped. Score of a component = mean probability inside it x the decoder's predicted IoU for
   that class (clipped to [0, 1]). Source ``lpsam:<class>``.
2. Optional SAM automatic-mask proposals (computed from the adapted encoder, prompt engine
   bypassed), source ``sam-amg``, score = SAM's predicted IoU. A proposal is dropped when its
   mask IoU with any class component, or with a higher-scored proposal already kept, exceeds
   ``amg_iou_threshold`` (IoU suppression; class masks win).
3. The residual region (pixels covered by no mask) is added by ``MaskSet.finalize``.
Masks may overlap; ids are 1..M in this order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from anaus_core.maskset import MaskSet

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def class_components(
    probabilities: np.ndarray,
    iou_predictions: np.ndarray,
    class_names: Sequence[str],
    *,
    threshold: float = 0.5,
    min_area: int = 16,
    foreground: np.ndarray | None = None,
) -> MaskSet:
    """probabilities float (K, H, W) in [0, 1]; iou_predictions (K,). Returns raw components.

    ``foreground`` (K, H, W) bool, when given, is ``probabilities > threshold`` computed already
    (on the device, by the predictor); ``threshold`` is then not used again.
    """
    height, width = probabilities.shape[1:]
    masks, sources, scores = [], [], []
    for k, name in enumerate(class_names):
        foreground_k = probabilities[k] > threshold if foreground is None else foreground[k]
        labels, count = ndimage.label(foreground_k, structure=EIGHT_CONNECTED)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        sums = np.bincount(labels.ravel(), weights=probabilities[k].ravel().astype(np.float64), minlength=count + 1)
        quality = float(np.clip(iou_predictions[k], 0.0, 1.0))
        for component in range(1, count + 1):
            if areas[component] < min_area:
                continue
            masks.append(labels == component)
            sources.append(f"lpsam:{name}")
            scores.append(sums[component] / areas[component] * quality)
    if not masks:
        return MaskSet.empty(height, width)
    return MaskSet(masks=np.stack(masks), ids=np.arange(1, len(masks) + 1), sources=sources, scores=np.asarray(scores, np.float32))


def mask_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pairwise IoU of bool masks (A, H, W) x (B, H, W) -> (A, B)."""
    a = first.reshape(len(first), -1).astype(np.float32)
    b = second.reshape(len(second), -1).astype(np.float32)
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1), 0.0)


def merge_proposals(base: MaskSet, proposals: MaskSet, *, iou_threshold: float = 0.7) -> MaskSet:
    """Append ``proposals`` (highest score first) that overlap no kept mask by IoU above the threshold."""
    height, width = base.shape
    if not len(proposals):
        return base
    kept = list(base.masks)
    kept_sources, kept_scores = list(base.sources), list(base.scores)
    for index in sorted(range(len(proposals)), key=lambda i: (-float(proposals.scores[i]), i)):
        candidate = proposals.masks[index]
        if kept and mask_iou(candidate[None], np.stack(kept)).max() > iou_threshold:
            continue
        kept.append(candidate)
        kept_sources.append(proposals.sources[index])
        kept_scores.append(float(proposals.scores[index]))
    if not kept:
        return MaskSet.empty(height, width)
    return MaskSet(masks=np.stack(kept), ids=np.arange(1, len(kept) + 1), sources=kept_sources, scores=np.asarray(kept_scores, np.float32))


def amg_records_to_mask_set(records: list[dict], height: int, width: int, *, source: str = "sam-amg") -> MaskSet:
    """``SamAutomaticMaskGenerator.generate`` output (binary_mask mode) -> MaskSet."""
    if not records:
        return MaskSet.empty(height, width)
    masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
    scores = np.clip([float(r["predicted_iou"]) for r in records], 0.0, 1.0)
    return MaskSet(masks=masks, ids=np.arange(1, len(records) + 1), sources=[source] * len(records), scores=scores)
