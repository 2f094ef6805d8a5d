"""Every random draw of the paired views for a whole batch at once: crops, flips, mask ids, core box.

Per sample these draws are a handful of tiny numpy calls, and at ~1 ms of decode per sample
their Python overhead was a tenth of a DataLoader worker's time (docs/benchmarks.md, input
pipeline). Here each quantity is one vectorised call over the batch, driven by one generator
(the stream seeds it from (seed, epoch, global batch number), so a batch is reproducible
whichever worker makes it and after a resume). The distributions are those of the per-sample
code: torchvision's ``RandomResizedCrop.get_params`` (``geometry.sample_resized_crop``), flips
with probability ``flip_p``, K ids with replacement ∝ area in both views (``sampling``), from the
masks present in both views (``ViewConfig.mask_presence="both"``, default) or in either
(``"either"``, DetCon's draw).

Mask areas per view come from the stored area-fraction pyramid (``sampling_area="grid"``: one
batched matrix product for all samples and both views) or from exact pixel counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from anaus_core.augment.geometry import CropBox, box_area_exact
from anaus_core.augment.probe_geometry import depth_rows, estimate_fan_apex, face_radius, kept_rows


@dataclass(frozen=True)
class BatchDraws:
    """The random part of B samples' paired views.

    Attributes:
        crops: int64 (B, 2, 4) (top, left, height, width) of view 1 and view 2, original pixels.
        flips: bool (B, 2).
        chosen: int64 (B, K) index of each slot's mask in its sample's mask list; -1 = no mask
            (the image has no mask present in both views, or in either with ``"either"``).
        core: int64 (B, 4) the overlap of both crops (zeros where ``core_valid`` is False).
        core_valid: bool (B,).
        depth: float64 (B, 2) fraction of the depth range each view keeps (1 = no depth crop;
            the crops already lie inside the kept rows).
        sector: float64 (B, 2) sector-angle factor of each view (1 = unchanged).
        convexity: float64 (B, 2) probe-face radius factor of each view (1 = unchanged).
        apex: float64 (B, 3) (row, column, face radius) of each sample's fan apex; NaN where
            none was found.
    """

    crops: np.ndarray
    flips: np.ndarray
    chosen: np.ndarray
    core: np.ndarray
    core_valid: np.ndarray
    depth: np.ndarray | None = None
    sector: np.ndarray | None = None
    apex: np.ndarray | None = None
    convexity: np.ndarray | None = None

    def sector_warp(self, sample: int, view: int) -> tuple[tuple[float, float, float], float, float] | None:
        """(apex (row, column, face radius), angle factor, convexity factor) of a view's
        sector change, or None when it has none."""
        if self.sector is None or not np.isfinite(self.apex[sample]).all():
            return None
        factor, convexity = float(self.sector[sample, view]), float(self.convexity[sample, view])
        if factor == 1.0 and convexity == 1.0:
            return None
        return tuple(float(v) for v in self.apex[sample]), factor, convexity

    def box(self, sample: int, view: int) -> CropBox:
        top, left, height, width = (int(v) for v in self.crops[sample, view])
        return CropBox(top, left, height, width)

    def core_box(self, sample: int) -> CropBox | None:
        if not self.core_valid[sample]:
            return None
        top, left, height, width = (int(v) for v in self.core[sample])
        return CropBox(top, left, height, width)


def sample_resized_crops(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray, *,
                         scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                         attempts: int = 10) -> np.ndarray:
    """``geometry.sample_resized_crop`` for n images at once: int64 (n, 4) boxes.

    All ``attempts`` candidate (area, aspect) pairs are drawn up front and the first that fits
    is kept — the same distribution as drawing them one by one and stopping (the attempts are
    i.i.d.); rows where none fits get the clamped centre crop, as in torchvision.
    """
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    count = len(heights)
    area = (heights * widths).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], (count, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (count, attempts)))
    # np.rint rounds half to even, exactly like the reference's int(round(...))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    found = fits[np.arange(count), first]
    box_h = np.where(found, h[np.arange(count), first], 0)
    box_w = np.where(found, w[np.arange(count), first], 0)
    # fallback: centre crop clamped to the ratio range (rows without a fitting attempt)
    in_ratio = widths / np.maximum(heights, 1)
    low, high = min(ratio), max(ratio)
    fallback_w = np.where(in_ratio < low, widths, np.where(in_ratio > high, np.rint(heights * high).astype(np.int64), widths))
    fallback_h = np.where(in_ratio < low, np.rint(widths / low).astype(np.int64), heights)
    box_h = np.where(found, box_h, fallback_h)
    box_w = np.where(found, box_w, fallback_w)
    # one integer draw per row for each offset (also for fallback rows, which ignore it: the
    # stream of draws then does not depend on which rows fell back)
    top = rng.integers(0, heights - box_h + 1)
    left = rng.integers(0, widths - box_w + 1)
    top = np.where(found, top, (heights - box_h) // 2)
    left = np.where(found, left, (widths - box_w) // 2)
    return np.stack([top, left, box_h, box_w], axis=1).astype(np.int64)


def cell_overlaps(starts: np.ndarray, stops: np.ndarray, extents: np.ndarray, cells: int) -> np.ndarray:
    """float64 (..., cells): length of ``[start, stop)`` inside each of ``cells`` equal cells of
    ``[0, extent)``; ``starts``/``stops`` (B, V) with one extent per row B."""
    edges = np.arange(cells + 1, dtype=np.float64)[None, :] * (np.asarray(extents, np.float64)[:, None] / cells)  # (B, g+1)
    low = np.maximum(edges[:, None, :-1], starts[..., None])
    high = np.minimum(edges[:, None, 1:], stops[..., None])
    return np.maximum(high - low, 0.0)


def grid_view_areas(grids: Sequence[np.ndarray], crops: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """float64 (B, M_max, 2): each mask's pixel area inside each view's crop, from its
    area-fraction grid (``geometry.box_area_from_grid``'s model: uniform inside a cell, exact
    for whole cells, interpolated on the crop border). Rows past a sample's M are zero.

    ``grids``: per sample (M_b, g_h, g_w), all the same (g_h, g_w); uint8 = the stored pyramid
    (fraction × 255) or float fractions. One batched float32 product for all samples and both
    views (relative error ~1e-6, immaterial for sampling weights).
    """
    batch = len(grids)
    counts = [len(grid) for grid in grids]
    most = max(counts) if counts else 0
    areas = np.zeros((batch, most, 2), np.float64)
    if most == 0:
        return areas
    grid_h, grid_w = grids[0].shape[1:]
    if any(grid.shape[1:] != (grid_h, grid_w) for grid in grids):
        raise ValueError(f"area grids of one batch must share their cell shape, got {sorted({g.shape[1:] for g in grids})}")
    scales = np.array([1 / 255 if grid.dtype == np.uint8 else 1.0 for grid in grids])
    if len(set(counts)) == 1:  # the common case: one stack + one conversion for the batch
        stacked = np.stack(grids).astype(np.float32, copy=False).reshape(batch, most * grid_h, grid_w)
    else:
        stacked = np.zeros((batch, most * grid_h, grid_w), np.float32)
        for index, grid in enumerate(grids):
            stacked[index, :len(grid) * grid_h] = grid.reshape(-1, grid_w)
    top, left, box_h, box_w = (crops[..., i].astype(np.float64) for i in range(4))
    rows = cell_overlaps(top, top + box_h, heights, grid_h).astype(np.float32)     # (B, 2, g_h)
    cols = cell_overlaps(left, left + box_w, widths, grid_w).astype(np.float32)    # (B, 2, g_w)
    by_row = (stacked @ cols.transpose(0, 2, 1)).reshape(batch, most, grid_h, 2)   # (B, M, g_h, 2)
    areas[:] = np.einsum("bmhv,bvh->bmv", by_row, rows)
    return areas * scales[:, None, None]


def exact_view_areas(masks: Sequence, crops: np.ndarray) -> np.ndarray:
    """float64 (B, M_max, 2): exact pixel counts per view; ``masks[b]`` is a bool (M, H, W)
    array or anything with ``areas_in_box(CropBox)`` (``views.MaskLayers``)."""
    counts = [len(m) for m in masks]
    areas = np.zeros((len(masks), max(counts) if counts else 0, 2), np.float64)
    for index, sample_masks in enumerate(masks):
        if not counts[index]:
            continue
        for view in range(2):
            box = CropBox(*(int(v) for v in crops[index, view]))
            counted = sample_masks.areas_in_box(box) if hasattr(sample_masks, "areas_in_box") else box_area_exact(sample_masks, box)
            areas[index, :counts[index], view] = counted
    return areas


def sample_mask_slots(weights: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``sampling.sample_mask_indices`` for every row of a (B, M) weight matrix at once.

    Returns int64 (B, num_samples), P(i) ∝ weights[b, i] with replacement; -1 for rows with no
    positive weight. One inverse-CDF draw over the concatenated rows: each row's draws are
    offset into its own stretch of the global cumulative sum.
    """
    weights = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    batch, count = weights.shape
    chosen = np.full((batch, num_samples), -1, np.int64)
    uniforms = rng.random((batch, num_samples))  # drawn even for empty rows: a fixed stream
    if count == 0:
        return chosen
    cdf = np.cumsum(weights.reshape(-1))
    ends = cdf[count - 1::count]
    starts = np.concatenate([[0.0], ends[:-1]])
    totals = ends - starts
    present = np.isfinite(totals) & (totals > 0)
    draws = starts[:, None] + uniforms * totals[:, None]
    found = np.searchsorted(cdf, draws.reshape(-1), side="right").reshape(batch, num_samples) - np.arange(batch)[:, None] * count
    # rounding can put a draw at or past the row's end: clamp to its last mask with weight
    last_present = count - 1 - (weights[:, ::-1] > 0).argmax(axis=1)
    found = np.clip(found, 0, last_present[:, None])
    chosen[present] = found[present]
    return chosen


def draw_batch(rng: np.random.Generator, shapes: Sequence[tuple[int, int]], *, config, grids: Sequence[np.ndarray | None] | None = None,
               masks: Sequence | None = None, regions: Sequence[np.ndarray | None] | None = None) -> BatchDraws:
    """All random draws of B samples' paired views.

    Args:
        rng: the batch's generator.
        shapes: (H, W) of each stored image.
        config: ``views.ViewConfig`` (crop ranges, flip_p, K, core_min_side, sampling_area, size).
        grids: per sample, the area-fraction grid of its masks (``sampling_area="grid"``), or None.
        masks: per sample, its masks (bool (M, H, W) or ``MaskLayers``) — used for exact areas
            when ``sampling_area="exact"`` or when a sample has no grid; also gives M.
        regions: per sample, its scan region (bool (H, W)) or None (the whole image). A core
            box with less than ``config.core_min_region`` of its pixels inside the region is
            invalid (``core_valid`` False): L_ctx would regress mostly black frame. Draws no
            random numbers, so the stream of draws does not depend on it.
    """
    batch = len(shapes)
    heights = np.repeat(np.array([s[0] for s in shapes], np.int64), 2)
    widths = np.repeat(np.array([s[1] for s in shapes], np.int64), 2)
    # probe-geometry changes (probe_geometry; off by default: no draws then, the stream of the
    # other draws is unchanged)
    depth = sector = apex = None
    crop_heights = heights
    if getattr(config, "depth_crop_p", 0.0) > 0:
        drawn = rng.random((batch, 2)) < config.depth_crop_p
        depth = np.where(drawn, rng.uniform(config.depth_crop_min, 1.0, (batch, 2)), 1.0)
        crop_heights = heights.copy()
        for b in range(batch):
            first, stop = depth_rows(None if regions is None else regions[b], shapes[b][0])
            for view in range(2):
                if depth[b, view] < 1.0:
                    crop_heights[2 * b + view] = kept_rows(first, stop, depth[b, view])
    convexity = None
    if getattr(config, "sector_angle_p", 0.0) > 0 or getattr(config, "convexity_p", 0.0) > 0:
        sector, convexity = np.ones((batch, 2)), np.ones((batch, 2))
        if config.sector_angle_p > 0:
            low, high = config.sector_angle_range
            drawn = rng.random((batch, 2)) < config.sector_angle_p
            sector = np.where(drawn, rng.uniform(low, high, (batch, 2)), 1.0)
        if config.convexity_p > 0:
            low, high = np.log(config.convexity_range)
            drawn = rng.random((batch, 2)) < config.convexity_p
            convexity = np.where(drawn, np.exp(rng.uniform(low, high, (batch, 2))), 1.0)
        apex = np.full((batch, 3), np.nan)
        for b in range(batch):
            if (sector[b] != 1.0).any() or (convexity[b] != 1.0).any():
                found = None if regions is None or regions[b] is None else estimate_fan_apex(regions[b])
                if found is not None:
                    apex[b] = found + (face_radius(regions[b], found),)
        found = np.isfinite(apex).all(axis=1)
        sector = np.where(found[:, None], sector, 1.0)
        # a convexity change needs a curved face (a curvilinear probe): a phased array's apex
        # sits on its face, and a face of a few pixels would be a large warp of the near field
        curved = found & (np.nan_to_num(apex[:, 2]) >= 0.05 * np.array([s[0] for s in shapes]))
        convexity = np.where(curved[:, None], convexity, 1.0)
        # float32 values: the device path receives them as float32 and must warp identically
        sector, convexity, apex = (a.astype(np.float32).astype(np.float64) for a in (sector, convexity, apex))
    crops = sample_resized_crops(rng, crop_heights, widths, scale=(config.scale_min, config.scale_max),
                                 ratio=(config.ratio_min, config.ratio_max)).reshape(batch, 2, 4)
    flips = rng.random((batch, 2)) < config.flip_p

    if masks is None and (grids is None or any(g is None for g in grids)):
        raise ValueError("draw_batch needs the masks of samples that have no area grid")
    counts = [len(m) for m in masks] if masks is not None else [len(g) for g in grids]
    areas = np.zeros((batch, max(counts + [0]), 2), np.float64)
    by_grid = [b for b in range(batch) if counts[b] and config.sampling_area == "grid" and grids is not None
               and grids[b] is not None]
    if by_grid:
        # grids of different resolutions in one batch (not written by this project's store):
        # the first resolution's samples by grid, the others by exact counts
        cell = grids[by_grid[0]].shape[1:]
        by_grid = [b for b in by_grid if grids[b].shape[1:] == cell]
        found = grid_view_areas([grids[b] for b in by_grid], crops[by_grid], heights[::2][by_grid], widths[::2][by_grid])
        areas[by_grid, :found.shape[1]] = found
    by_count = [b for b in range(batch) if counts[b] and b not in set(by_grid)]
    if by_count:
        if masks is None:
            raise ValueError("draw_batch needs the masks when the areas cannot come from grids (sampling_area='exact')")
        found = exact_view_areas([masks[b] for b in by_count], crops[by_count])
        areas[by_count, :found.shape[1]] = found
    # weights in view pixels: what the loss sees after each crop is resized to S×S
    per_view = config.size ** 2 / (crops[..., 2] * crops[..., 3]).astype(np.float64)     # (B, 2)
    view_areas = areas * per_view[:, None, :]                                            # (B, M, 2)
    weights = view_areas.sum(axis=2)
    if getattr(config, "mask_presence", "either") == "both":
        # only masks visible in both views: every slot then has its positive in the other view
        threshold = max(float(getattr(config, "min_view_area", 1.0)), np.finfo(np.float64).tiny)
        weights = np.where((view_areas >= threshold).all(axis=2), weights, 0.0)
    chosen = sample_mask_slots(weights, config.num_mask_samples, rng)

    top = np.maximum(crops[:, 0, 0], crops[:, 1, 0])
    left = np.maximum(crops[:, 0, 1], crops[:, 1, 1])
    bottom = np.minimum(crops[:, 0, 0] + crops[:, 0, 2], crops[:, 1, 0] + crops[:, 1, 2])
    right = np.minimum(crops[:, 0, 1] + crops[:, 0, 3], crops[:, 1, 1] + crops[:, 1, 3])
    core_valid = np.minimum(bottom - top, right - left) >= max(1, config.core_min_side)
    if regions is not None:
        core_valid &= core_region_coverage(regions, top, left, bottom, right) >= getattr(config, "core_min_region", 0.0)
    core = np.where(core_valid[:, None], np.stack([top, left, bottom - top, right - left], axis=1), 0).astype(np.int64)
    return BatchDraws(crops=crops, flips=flips, chosen=chosen, core=core, core_valid=core_valid,
                      depth=depth, sector=sector, apex=apex, convexity=convexity)


def core_region_coverage(regions: Sequence[np.ndarray | None], top: np.ndarray, left: np.ndarray, bottom: np.ndarray,
                         right: np.ndarray) -> np.ndarray:
    """float64 (B,): fraction of each box's stored pixels inside its sample's scan region (1 for
    a sample without a region, 0 for an empty box)."""
    coverage = np.ones(len(regions), np.float64)
    for index, region in enumerate(regions):
        if region is None:
            continue
        cut = np.asarray(region, bool)[max(0, top[index]):max(0, bottom[index]), max(0, left[index]):max(0, right[index])]
        coverage[index] = cut.mean() if cut.size else 0.0
    return coverage
