"""Probe-geometry view changes of the ``ultrasound`` policy: depth crop and sector-angle change.

Both are geometric, so they are drawn with the other per-view geometry (``draws.draw_batch``,
from the batch generator) and move the image, its masks and its scan region together.

* Depth crop (``ViewConfig.depth_crop_p``): the view sees a shallower field of view — only the
  top fraction ``d ~ U(depth_crop_min, 1)`` of the scan's depth range (of the scan region's rows
  when the sample has one, else of the image) — and the usual random resized crop is then drawn
  inside those rows. It is a restriction of where the crop box may lie, so masks, region and
  core follow it with no resampling of their own.
* Sector angle (``ViewConfig.sector_angle_p``): for a sector / curvilinear image, a polar
  resampling about the fan apex that scales every angle from the fan's axis by ``a ~
  U(sector_angle_range)`` (a > 1 widens the fan, a < 1 narrows it) and keeps every radius:
  a probe with a wider or narrower field of view. The apex comes from the scan region's two
  fan edges (``estimate_fan_apex``); an image without a region, or whose region is not a fan
  (a linear probe: parallel edges), is left as it is. Each output pixel reads the source point
  ``source_points`` gives: the image bilinearly, the masks and region at the source pixel that
  contains that point (nearest-exact, the masks' rule everywhere in this package), so a mask
  stays on the anatomy it outlines. The warp is applied to the whole stored image before the
  view's crop, which is then cut from the warped image as usual.

Approximations (documented in docs/objectives.md): the ids' sampling weights are the masks'
areas in the un-warped crop; the core of L_ctx is cut from the un-warped image (it is compared
only with itself, damaged, so it needs no correspondence with the views).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def estimate_fan_apex(region: np.ndarray, *, min_opening: float = 0.2) -> tuple[float, float] | None:
    """(row, column) of a sector scan's apex from its scan region (bool (H, W)), in continuous
    pixel coordinates (pixel ``i`` spans ``[i, i + 1)``), or None when the region is no fan.

    A line is fitted to each edge of the region (first and last column of every row from 15 % to
    55 % of its depth: the fan's straight sides, below a convex probe's curved top and above the
    deep arc, which reaches up to ~70 % of the depth at the sides of a 90° fan); the apex is where they meet.
    None when the edges open by less than ``min_opening`` (difference of the slopes in
    columns per row: ~11° total opening at 0.2, i.e. a linear probe), or when the edges meet
    below the region's upper quarter (not a fan).
    """
    region = np.asarray(region, bool)
    rows = np.flatnonzero(region.any(axis=1))
    if len(rows) < 8:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    extent = bottom - top
    band = rows[(rows >= top + 0.15 * extent) & (rows < top + 0.55 * extent)]
    if len(band) < 4:
        return None
    lines = region[band]
    left = lines.argmax(axis=1).astype(np.float64)                             # first column inside
    right = region.shape[1] - lines[:, ::-1].argmax(axis=1).astype(np.float64)  # past the last one
    # rows where the fan is cut by the image's side say nothing about its edges
    free = (left > 0) & (right < region.shape[1])
    if free.sum() < 4:
        return None
    band, left, right = band[free], left[free], right[free]
    centres = band.astype(np.float64) + 0.5
    slope_left, offset_left = np.polyfit(centres, left, 1)
    slope_right, offset_right = np.polyfit(centres, right, 1)
    opening = slope_right - slope_left
    if not opening >= min_opening:
        return None
    apex_row = (offset_left - offset_right) / opening
    if apex_row > top + 0.25 * extent:
        return None
    return float(apex_row), float(slope_left * apex_row + offset_left)


def source_points(height: int, width: int, apex: torch.Tensor, factor: torch.Tensor,
                  convexity: torch.Tensor | None = None, *,
                  window: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel of the sector-angle / convexity change reads, for a batch.

    Args:
        height, width: the image (canvas) size.
        apex: float (N, 2) (row, column) of each image's apex, continuous pixel coordinates, or
            (N, 3) with the probe face's radius ``R`` (apex to the top of the fan on its axis)
            as the third column (needed for ``convexity``).
        factor: float (N,) angle scale ``a``; 1 = identity.
        convexity: optional float (N,) face-radius scale ``c``; 1 (or None) = identity.

    Returns:
        float64 (N, H, W) source rows and columns, continuous coordinates. Output pixel (y, x)
        (centre ``(y + .5, x + .5)``) is taken at radius ``r'`` and angle ``θ'`` (θ = 0 straight
        down the fan's axis) from the output apex, which sits ``(1 - c) R`` below the source apex
        (the face's centre stays put). Its depth below the face ``t = r' - cR`` and its arc
        length along the face ``s = cR θ'`` are kept: it reads the source point at radius
        ``R + t`` and angle ``s / (R a)`` — for ``c = 1`` radius ``r'`` and angle ``θ' / a``,
        a pure sector-angle change; ``c > 1`` flattens a curvilinear probe, ``c < 1`` curves it
        more. Points above the apex side of the face (``R + t < 0``) read outside the image.
        ``window`` (top, left, h, w): only the output pixels of that box, (N, h, w) (a view's
        crop reads nothing else).
    """
    device = apex.device
    apex = apex.to(torch.float64)
    factor = factor.to(torch.float64)
    face = apex[:, 2] if apex.shape[1] > 2 else torch.zeros_like(apex[:, 0])
    scale = torch.ones_like(face) if convexity is None else convexity.to(device=device, dtype=torch.float64)
    out_apex_row = apex[:, 0] + (1.0 - scale) * face
    top, left, height, width = window if window is not None else (0, 0, height, width)
    ys = torch.arange(top, top + height, device=device, dtype=torch.float64)[None, :, None] + 0.5 - out_apex_row[:, None, None]
    xs = torch.arange(left, left + width, device=device, dtype=torch.float64)[None, None, :] + 0.5 - apex[:, 1, None, None]
    out_face = (scale * face)[:, None, None]
    # depth t = r' - cR kept, so the source radius is R + t; arc s = cR θ' kept, so the source
    # angle is s / (R a) = θ' c / a (also for R = 0, where no convexity change is drawn)
    radius = torch.hypot(ys, xs) - out_face + face[:, None, None]
    angle = torch.atan2(xs, ys) * (scale / factor)[:, None, None]
    rows = apex[:, 0, None, None] + radius * torch.cos(angle)
    cols = apex[:, 1, None, None] + radius * torch.sin(angle)
    behind = radius < 0
    return torch.where(behind, -1.0, rows), torch.where(behind, -1.0, cols)


def face_radius(region: np.ndarray, apex: tuple[float, float]) -> float:
    """Distance from the apex to the top of the fan on its axis (the probe face's radius of a
    curvilinear probe; ~0 for a phased array whose apex is on the face)."""
    column = int(np.clip(np.floor(apex[1]), 0, region.shape[1] - 1))
    rows = np.flatnonzero(np.asarray(region, bool)[:, column])
    return max(0.0, float(rows[0]) - apex[0]) if len(rows) else 0.0


def warp_images(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of float (N, C, H, W) images at the continuous source points
    (N, h, w) -> (N, C, h, w); zero outside the image (the black frame)."""
    height, width = images.shape[-2:]
    grid = torch.stack([2.0 * cols / width - 1.0, 2.0 * rows / height - 1.0], dim=-1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_labels(labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Nearest-exact resampling of integer (N, L, H, W) label layers (or {0, 1} regions) at the
    source points (N, h, w): each output pixel takes the label of the source pixel that contains
    its source point; 0 outside. Returns (N, L, h, w)."""
    count, layers, height, width = labels.shape
    row = torch.floor(rows).to(torch.int64)
    col = torch.floor(cols).to(torch.int64)
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    flat = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).reshape(count, 1, -1).expand(count, layers, -1)
    gathered = torch.gather(labels.reshape(count, layers, -1), 2, flat).reshape(count, layers, *rows.shape[-2:])
    return gathered * inside[:, None].to(gathered.dtype)


def sector_warp_numpy(image: np.ndarray, layers: np.ndarray | None, region: np.ndarray | None,
                      apex: tuple[float, ...], factor: float, convexity: float = 1.0, *,
                      window: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The worker path's sector-angle / convexity change of one sample: uint8 image (H, W)
    (rounded back to uint8), label layers (L, H, W) and region (H, W) warped with
    ``source_points``; ``apex`` (row, column[, face radius]). ``window``: only that box of the
    output (top, left, h, w); the results are then (h, w)."""
    height, width = image.shape
    rows, cols = source_points(height, width, torch.tensor([apex], dtype=torch.float64),
                               torch.tensor([float(factor)]), torch.tensor([float(convexity)]), window=window)
    pixels = torch.from_numpy(np.ascontiguousarray(image, np.uint8)).to(torch.float32)[None, None]
    warped = warp_images(pixels, rows, cols).round_().clamp_(0, 255).to(torch.uint8)[0, 0].numpy()
    out_layers = out_region = None
    if layers is not None:
        source = torch.from_numpy(np.ascontiguousarray(layers).astype(np.int32, copy=False))[None]
        out_layers = warp_labels(source, rows, cols)[0].numpy().astype(layers.dtype)
    if region is not None:
        source = torch.from_numpy(np.ascontiguousarray(region, np.uint8))[None, None]
        out_region = warp_labels(source, rows, cols)[0, 0].numpy().astype(bool)
    return warped, out_layers, out_region


def depth_rows(region: np.ndarray | None, height: int) -> tuple[int, int]:
    """(first, stop) rows of the scan's depth range: the region's rows, or the whole image."""
    if region is None:
        return 0, height
    rows = np.flatnonzero(np.asarray(region, bool).any(axis=1))
    return (0, height) if not len(rows) else (int(rows[0]), int(rows[-1]) + 1)


def kept_rows(first: int, stop: int, fraction: float) -> int:
    """Rows of the image a depth crop to ``fraction`` of ``[first, stop)`` keeps (at least one)."""
    return max(1, min(stop, first + int(math.ceil(fraction * (stop - first)))))
