"""Shared by the weight-free maskers: a segment label map -> a MaskSet of proposals."""

from __future__ import annotations

import numpy as np

from anaus_core.maskset import MaskSet


def masks_from_segments(segments: np.ndarray, *, source: str, min_segment_area: int) -> MaskSet:
    """One mask per segment id of an integer map (every id >= 0 is a segment, 0 included;
    negative ids mark pixels outside the scan region, which belong to no mask).

    Segments smaller than ``min_segment_area`` pixels are not materialised: speckle makes
    classical segmenters emit hundreds of tiny fragments, and a (M, H, W) bool stack of them
    would cost memory for masks that ``MaskSet.finalize`` drops anyway. Masks come out in
    segment-id order, which the callers make deterministic. Scores are 1.0 (these sources have
    no confidence; ``finalize`` then ranks by area).
    """
    segments = np.asarray(segments)
    height, width = segments.shape
    flat = segments.reshape(-1).astype(np.int64, copy=False)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    kept = np.flatnonzero((counts >= max(1, int(min_segment_area))) & (values >= 0))
    if len(kept) == 0:
        return MaskSet.empty(height, width)
    masks = inverse.reshape(1, height, width) == kept.reshape(-1, 1, 1)
    return MaskSet(masks=masks, ids=np.arange(1, len(kept) + 1), sources=[source] * len(kept), scores=np.ones(len(kept)))


def scan_region_of(meta, shape: tuple[int, int]) -> np.ndarray | None:
    """The scan region the pipeline passes in ``meta.extra["scan_region"]`` (bool (H, W)), or
    None when there is none or it does not fit the image."""
    region = getattr(meta, "extra", {}).get("scan_region") if meta is not None else None
    if region is None:
        return None
    region = np.asarray(region, bool)
    return region if region.shape == tuple(shape) and region.any() else None
