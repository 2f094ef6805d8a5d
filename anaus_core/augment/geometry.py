"""Geometry of one view: random resized crop + horizontal flip, applied to an image and its masks.

A view is ``flip(resize(crop(x, box), size))``. The crop box ``(top, left, height, width)`` is in
original-image pixels and is recorded *before* the flip: flipping the resized crop does not change
which original pixels it shows, so the box of the two views can be intersected directly (the
overlap / "core" region of L_ctx). ``overlap_in_view`` maps such an original-coordinate box into
a view's pixel coordinates, flip-aware.

Images are resampled with torchvision's bilinear, antialiased ``resized_crop``; masks with the
"nearest-exact" rule (the source pixel that contains the centre of each output pixel), which is
what torchvision's ``InterpolationMode.NEAREST_EXACT`` computes for ``tv_tensors.Mask``. We gather
those indices with numpy instead of calling torchvision once per mask set because it is ~10x
faster for a stack of masks; ``tests/test_views.py`` holds the gather equal to torchvision.
Nearest-exact (not torchvision's legacy ``NEAREST``, which is shifted by half an input pixel) is
the rule whose pixel centres coincide with those of the bilinear image resampling, so a mask and
the anatomy it outlines stay aligned to sub-pixel accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class CropBox:
    """An axis-aligned box in original-image pixels: rows ``top:top+height``, cols ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def as_array(self) -> np.ndarray:
        return np.array([self.top, self.left, self.height, self.width], dtype=np.float32)


def sample_resized_crop(rng: np.random.Generator, height: int, width: int, *,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropBox:
    """torchvision's ``RandomResizedCrop.get_params`` algorithm driven by an explicit numpy generator.

    Ten attempts at a box of area ``U(scale) × H × W`` and log-uniform aspect ``ratio``; if none
    fits, a centre crop clamped to ``ratio``. torchvision draws from the global torch RNG, which
    a per-sample deterministic stream cannot use without save/restore (~350 µs per call), hence
    the re-statement; ``tests/test_views.py`` compares the two distributions.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def nearest_exact_indices(start: int, length: int, size: int) -> np.ndarray:
    """Source index of each of ``size`` output pixels when ``length`` input pixels from ``start``
    are resized to ``size`` with nearest-exact, rounding exactly as torch does."""
    scale = np.float32(length) / np.float32(size)
    index = np.floor((np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    return start + np.minimum(index, length - 1)


def warp_masks(masks: np.ndarray, box: CropBox, flip: bool, size: int) -> np.ndarray:
    """Crop ``masks`` (U, H, W) to ``box``, resize to ``size``×``size`` (nearest-exact), flip if asked.

    Returns an array of the input dtype, shape (U, size, size).
    """
    rows = nearest_exact_indices(box.top, box.height, size)
    cols = nearest_exact_indices(box.left, box.width, size)
    if flip:
        cols = cols[::-1]
    # rows then columns with np.take keeps every intermediate contiguous (a combined fancy index
    # yields a strided array that later costs more to pack than the gather itself)
    return np.take(np.take(masks, rows, axis=1), cols, axis=2)


def warp_label_layers(layers: np.ndarray, box: CropBox, flip: bool, size: int) -> np.ndarray:
    """``warp_masks`` on label layers (L, H, W): one gather per layer instead of one per mask.

    Nearest-exact gathering commutes with the per-pixel test ``layer == value``, so
    ``warp_label_layers(layers)[l] == v`` is exactly ``warp_masks(layers[l] == v)``. Returns a
    contiguous (L, size, size) array of the layers' dtype.
    """
    return warp_masks(layers, box, flip, size)


def warp_image(image: np.ndarray, box: CropBox, flip: bool, size: int) -> np.ndarray:
    """Crop a uint8 (H, W) image to ``box``, resize to ``size``×``size`` (bilinear, antialiased,
    torchvision ``resized_crop``), flip if asked. Returns uint8 (size, size)."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # decoded PNG buffers are read-only; torch wants writable memory
        image = image.copy()
    tensor = torch.from_numpy(image)[None]
    out = TF.resized_crop(tensor, box.top, box.left, box.height, box.width, [size, size],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = TF.horizontal_flip(out)
    return out[0].numpy()


def resize_region(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """``warp_image`` without flip: the region ``box`` of a uint8 image resized to ``size``×``size``."""
    return warp_image(image, box, False, size)


def intersect_boxes(a: CropBox, b: CropBox) -> CropBox | None:
    """The overlap of two boxes in the same (original-image) coordinates, or None if they are disjoint."""
    top, left = max(a.top, b.top), max(a.left, b.left)
    bottom, right = min(a.bottom, b.bottom), min(a.right, b.right)
    if bottom <= top or right <= left:
        return None
    return CropBox(top, left, bottom - top, right - left)


def overlap_in_view(box: CropBox, crop: CropBox, flip: bool, size: int) -> tuple[float, float, float, float]:
    """Where the original-coordinate ``box`` lands in a view made from ``crop`` (+ ``flip``) at ``size``.

    Returns (top, left, height, width) in the view's continuous pixel coordinates (pixel ``i``
    spans ``[i, i+1)``). The flip mirrors the horizontal interval: ``[x0, x1) -> [size-x1, size-x0)``.
    """
    scale_y = size / crop.height
    scale_x = size / crop.width
    top = (box.top - crop.top) * scale_y
    bottom = (box.bottom - crop.top) * scale_y
    left = (box.left - crop.left) * scale_x
    right = (box.right - crop.left) * scale_x
    if flip:
        left, right = size - right, size - left
    return (top, left, bottom - top, right - left)


def box_area_from_grid(fractions: np.ndarray, box: CropBox, height: int, width: int) -> np.ndarray:
    """Estimated pixel area of each mask inside ``box`` from a coarse area-fraction grid.

    ``fractions``: float (M, g, g), fraction of each grid cell covered by the mask (the stored
    mask pyramid / 255). A cell ``(i, j)`` spans rows ``[i·H/g, (i+1)·H/g)`` and columns
    ``[j·W/g, (j+1)·W/g)``; the mask is taken as spread uniformly inside a cell, so the estimate
    is exact for cells wholly inside or outside the box and interpolates on the box border.
    """
    return box_areas_from_grid(fractions, [box], height, width)[0]


def _cell_overlaps(starts: np.ndarray, stops: np.ndarray, extent: int, cells: int) -> np.ndarray:
    """(n, cells): length of each ``[start, stop)`` inside each of ``cells`` equal cells of ``[0, extent)``."""
    edges = np.arange(cells + 1, dtype=np.float64) * (extent / cells)
    inside = np.minimum(edges[None, 1:], stops[:, None]) - np.maximum(edges[None, :-1], starts[:, None])
    return np.maximum(inside, 0.0)


def box_areas_from_grid(fractions: np.ndarray, boxes: list[CropBox], height: int, width: int,
                        scale: float = 1.0) -> np.ndarray:
    """``box_area_from_grid`` for several boxes at once: float64 (len(boxes), M), times ``scale``.

    One matrix product over the grid for all boxes (the per-sample hot path needs two: one per
    view), in float32 (relative error ~1e-6, immaterial for sampling weights); ``scale`` lets a
    caller pass the stored uint8 pyramid with ``scale=1/255``.
    """
    count, grid_h, grid_w = fractions.shape
    corners = np.array([(b.top, b.bottom, b.left, b.right) for b in boxes], dtype=np.float64)
    rows = _cell_overlaps(corners[:, 0], corners[:, 1], height, grid_h).astype(np.float32)   # (n, g_h)
    cols = _cell_overlaps(corners[:, 2], corners[:, 3], width, grid_w).astype(np.float32)    # (n, g_w)
    grid = fractions.reshape(count * grid_h, grid_w).astype(np.float32, copy=False)
    by_row = (grid @ cols.T).reshape(count, grid_h, len(boxes))                              # (M, g_h, n)
    areas = np.stack([by_row[:, :, k] @ rows[k] for k in range(len(boxes))])
    return areas.astype(np.float64) * scale


def box_area_exact(masks: np.ndarray, box: CropBox) -> np.ndarray:
    """Exact pixel count of each of the (M, H, W) boolean masks inside ``box``."""
    region = masks[:, box.top:box.bottom, box.left:box.right]
    return region.view(np.uint8).sum(axis=(1, 2), dtype=np.int64)
