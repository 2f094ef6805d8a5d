"""Felzenszwalb-Huttenlocher graph-based segments (the DetCon-style image-computable proposals).

The image is optionally despeckled with a median filter, then segmented by
``skimage.segmentation.felzenszwalb``; every segment is one mask proposal with score 1.0.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from anaus_core.maskers._segments import masks_from_segments, scan_region_of, segment_at_bounded_resolution
from anaus_core.maskers.base import ImageMeta
from anaus_core.maskset import MaskSet

CODE_VERSION = "felzenszwalb-1"


class FelzenszwalbMasker:
    """Weight-free graph-based superpixel masker.

    Args:
        scale: FH "k": larger values give larger segments (intensities are in [0, 1]).
        sigma: Gaussian pre-smoothing inside ``felzenszwalb``.
        min_size: FH post-merge minimum segment size in pixels (at the stored size).
        median_size: median filter size applied first against speckle (0 or 1 disables).
        min_segment_area: segments smaller than this are not returned.
    """

    name = "felzenszwalb"

    def __init__(
        self,
        *,
        scale: float = 100.0,
        sigma: float = 1.0,
        min_size: int = 100,
        median_size: int = 5,
        min_segment_area: int = 16,
    ) -> None:
        if scale <= 0:
            raise ValueError("scale must be > 0")
        self.scale = float(scale)
        self.sigma = float(sigma)
        self.min_size = int(min_size)
        self.median_size = int(median_size)
        self.min_segment_area = int(min_segment_area)

    def options(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "sigma": self.sigma,
            "min_size": self.min_size,
            "median_size": self.median_size,
            "min_segment_area": self.min_segment_area,
        }

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "code_version": CODE_VERSION, "options": self.options()}

    def segment(self, image: np.ndarray) -> np.ndarray:
        """int (H, W) segment map of a uint8 (H, W) image."""
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected a (H, W) image, got shape {image.shape}")
        if self.median_size > 1:
            image = ndimage.median_filter(image, size=self.median_size)
        return felzenszwalb(image.astype(np.float64) / 255.0, scale=self.scale, sigma=self.sigma, min_size=self.min_size, channel_axis=None)

    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        results = []
        for image, meta in zip(images, metas):
            segments = np.asarray(segment_at_bounded_resolution(self.segment, image), np.int64)
            region = scan_region_of(meta, np.shape(image))
            if region is not None:
                # the graph is cut at the region's edge: a segment never spans the black screen
                segments = np.where(region, segments, -1)
            results.append(masks_from_segments(segments, source=self.name, min_segment_area=self.min_segment_area))
        return results
