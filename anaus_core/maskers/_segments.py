"""Shared by the weight-free maskers: a segment label map -> a MaskSet of proposals."""

from __future__ import annotations

import numpy as np

from anaus_core.maskset import MaskSet

MAX_PROPOSALS = 256  # segments materialised as masks per image (the largest ones)
MAX_SEGMENT_PIXELS = 1 << 20  # segmenters run on at most this many pixels (1024 x 1024)


def segment_at_bounded_resolution(segment, image: np.ndarray, *, region: np.ndarray | None = None,
                                  max_pixels: int = MAX_SEGMENT_PIXELS) -> np.ndarray:
    """``segment(image)`` (an int (H, W) label map) computed on a copy of ``image`` downscaled to
    at most ``max_pixels`` pixels, the labels upsampled back (nearest) to (H, W). With a bool
    (H, W) ``region`` the call is ``segment(image, region)`` (the region downscaled alike).

    Graph and clustering segmenters need memory and time that grow faster than the pixel count;
    working at a bounded resolution bounds both whatever image arrives. Images within the bound
    are segmented as they are (identical results).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if height * width <= max_pixels:
        return segment(image) if region is None else segment(image, region)
    from PIL import Image

    factor = (max_pixels / float(height * width)) ** 0.5
    small_h, small_w = max(1, int(height * factor)), max(1, int(width * factor))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((small_w, small_h), Image.Resampling.BOX))
    if region is None:
        labels = np.asarray(segment(small))
    else:
        pick_rows = np.minimum((np.arange(small_h) * height) // small_h, height - 1)
        pick_cols = np.minimum((np.arange(small_w) * width) // small_w, width - 1)
        labels = np.asarray(segment(small, np.asarray(region)[pick_rows[:, None], pick_cols[None, :]]))
    rows = np.minimum((np.arange(height) * small_h) // height, small_h - 1)
    cols = np.minimum((np.arange(width) * small_w) // width, small_w - 1)
    return labels[rows[:, None], cols[None, :]]


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
    if len(kept) > MAX_PROPOSALS:
        # Memory is bounded by design: at most MAX_PROPOSALS (H, W) masks are materialised, the
        # largest segments (``finalize`` ranks equal scores by area and keeps far fewer).
        largest = np.argsort(-counts[kept], kind="stable")[:MAX_PROPOSALS]
        kept = np.sort(kept[largest])
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
