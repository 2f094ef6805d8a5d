"""k-means on per-pixel features (the R2O-style weight-free mask source).

Each pixel is described by its (lightly smoothed) intensity, the local mean and local standard
deviation of the intensity at a few Gaussian scales (texture: speckle statistics differ between
tissues) and, optionally, its normalised position. Features are standardised per image, k-means
is fitted on a seeded random subset of pixels (scipy's ``kmeans2`` with k-means++ seeding) and
every pixel is assigned to its nearest centroid. Each cluster is split into connected
components; every component is one mask proposal with score 1.0. With a scan region
(``meta.extra["scan_region"]``, set by the precompute pipeline) the features are standardised
and the centroids fitted on the region's pixels only, and pixels outside it belong to no
segment: the black screen does not take a cluster of its own.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.cluster.vq import kmeans2, vq

from anaus_core.maskers._segments import masks_from_segments, scan_region_of, segment_at_bounded_resolution
from anaus_core.maskers.base import ImageMeta
from anaus_core.maskset import MaskSet

CODE_VERSION = "kmeans-1"


class KMeansMasker:
    """Weight-free k-means masker.

    Args:
        clusters: K, the number of k-means clusters per image.
        scales: Gaussian sigmas (pixels at the stored size) of the local mean/std features.
        smooth_sigma: sigma of the Gaussian applied to the intensity feature (despeckling).
        position_weight: weight of the two normalised coordinates after standardisation
            (0 disables them; larger values make clusters more compact).
        sample_pixels: pixels drawn (seeded) to fit the centroids; all pixels are then assigned.
        iterations: Lloyd iterations of ``kmeans2``.
        seed: seed of the pixel subset and the k-means++ initialisation.
        min_segment_area: components smaller than this are not returned (finalize drops small
            masks anyway; this bounds memory on speckled images).
        connectivity: 1 (4-neighbourhood) or 2 (8-neighbourhood) for the components.
    """

    name = "kmeans"

    def __init__(
        self,
        *,
        clusters: int = 6,
        scales: Sequence[float] = (3.0, 8.0),
        smooth_sigma: float = 1.0,
        position_weight: float = 1.0,
        sample_pixels: int = 8192,
        iterations: int = 20,
        seed: int = 0,
        min_segment_area: int = 16,
        connectivity: int = 2,
    ) -> None:
        if clusters < 2:
            raise ValueError("clusters must be >= 2")
        if connectivity not in (1, 2):
            raise ValueError("connectivity must be 1 or 2")
        self.clusters = int(clusters)
        self.scales = tuple(float(s) for s in scales)
        self.smooth_sigma = float(smooth_sigma)
        self.position_weight = float(position_weight)
        self.sample_pixels = int(sample_pixels)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.min_segment_area = int(min_segment_area)
        self.connectivity = int(connectivity)

    def options(self) -> dict[str, Any]:
        return {
            "clusters": self.clusters,
            "scales": list(self.scales),
            "smooth_sigma": self.smooth_sigma,
            "position_weight": self.position_weight,
            "sample_pixels": self.sample_pixels,
            "iterations": self.iterations,
            "seed": self.seed,
            "min_segment_area": self.min_segment_area,
            "connectivity": self.connectivity,
        }

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "code_version": CODE_VERSION, "options": self.options()}

    def features(self, image: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """float32 (H*W, F) standardised per-pixel features of a uint8 (H, W) image
        (statistics of the ``region`` pixels when given)."""
        intensity = np.asarray(image, dtype=np.float32) / 255.0
        smoothed = ndimage.gaussian_filter(intensity, self.smooth_sigma) if self.smooth_sigma > 0 else intensity
        columns = [smoothed]
        for sigma in self.scales:
            mean = ndimage.gaussian_filter(intensity, sigma)
            mean_sq = ndimage.gaussian_filter(intensity * intensity, sigma)
            columns += [mean, np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))]
        stack = np.stack([c.reshape(-1) for c in columns], axis=1)
        inside = stack if region is None else stack[region.reshape(-1)]
        std = inside.std(axis=0)
        stack = (stack - inside.mean(axis=0)) / np.where(std > 1e-6, std, 1.0)
        if self.position_weight > 0:
            height, width = image.shape
            rows, cols = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
            # Uniform coordinates on [-1, 1] have std 1/sqrt(3); rescale to unit std first.
            position = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1) * np.sqrt(3.0) * self.position_weight
            stack = np.concatenate([stack, position], axis=1)
        return stack.astype(np.float32)

    def segment(self, image: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """int32 (H, W) map of connected components of the k-means clusters (0..N-1; -1
        outside ``region`` when one is given)."""
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected a (H, W) image, got shape {image.shape}")
        inside = np.ones(image.shape, bool) if region is None else np.asarray(region, bool)
        if image[inside].min() == image[inside].max():
            return np.where(inside, 0, -1).astype(np.int32)
        features = self.features(image, None if region is None else inside)
        rng = np.random.default_rng(self.seed)
        candidates = features if region is None else features[inside.reshape(-1)]
        n_pixels = candidates.shape[0]
        subset = candidates[rng.choice(n_pixels, size=min(self.sample_pixels, n_pixels), replace=False)] if n_pixels > self.sample_pixels else candidates
        k = min(self.clusters, len(np.unique(subset, axis=0)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "One of the clusters is empty": harmless here
            centroids, _ = kmeans2(subset.astype(np.float64), k, iter=self.iterations, minit="++", rng=rng)
        assignment, _ = vq(features.astype(np.float64), centroids)
        # Number clusters by centroid intensity so the output order does not depend on the
        # arbitrary k-means labelling.
        rank = np.empty(len(centroids), np.int64)
        rank[np.lexsort(centroids.T[::-1])] = np.arange(len(centroids))
        clusters = rank[assignment].reshape(image.shape)
        structure = ndimage.generate_binary_structure(2, self.connectivity)
        segments = np.zeros(image.shape, np.int32)
        offset = 0
        for cluster in range(len(centroids)):
            components, count = ndimage.label((clusters == cluster) & inside, structure=structure)
            segments[components > 0] = components[components > 0] + offset - 1
            offset += count
        if region is not None:
            segments[~inside] = -1
        return segments

    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        return [
            masks_from_segments(segment_at_bounded_resolution(self.segment, image, region=scan_region_of(meta, np.shape(image))), source=self.name, min_segment_area=self.min_segment_area)
            for image, meta in zip(images, metas)
        ]
