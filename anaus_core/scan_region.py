"""The scan region of an ultrasound image or clip: the pixels that hold echo data.

A clinical B-mode frame is a fan (phased / curvilinear probe) or a rectangle (linear probe) of
echo data inside a black screen that also carries burned-in annotations: text, depth rulers,
caliper crosses, colour bars, logos. Everything the pre-training samples, pools or compares
must come from the echo data, so every mask is clipped to this region (``MaskSet.finalize``'s
``region``) and the residual becomes "scan region minus anatomy masks".

How it is found (:func:`detect_scan_region`, one region per image or per clip):

1. A reference image: the frame itself, or for a clip the per-pixel maximum over (up to
   ``max_frames``) frames, so a fan that is dark in some frames is still seen whole. A clip
   whose pixels move (median temporal std inside the bright area >= ``min_motion``) also
   marks bright pixels that never change as annotations: live echo decorrelates from frame to
   frame, burned-in text does not.
2. Annotation candidates: thin bright structures (white top-hat with a disk of radius
   ``stroke_radius`` above ``annotation_contrast``, at least ``annotation_level`` bright),
   coloured pixels (``colour``, from the ingest's chroma map) and, in a live clip, static bright
   pixels. Small isolated candidates inside textured tissue are speckle peaks, not text: a
   candidate component is kept only when it has at least ``min_annotation_px`` pixels.
3. Foreground: the median-filtered (3 x 3, which removes JPEG ringing and single-pixel noise
   without moving edges) reference above ``black_level``, minus the annotation candidates,
   opened with a disk of radius ``open_fraction`` x the short side (cuts rulers and ticks
   that touch the fan).
4. The largest 8-connected component, holes filled (dark cysts, shadows inside the fan),
   closed with a disk of ``close_fraction`` x the short side (notches where dark tissue meets
   the fan edge), dents of its convex hull that are narrow and small filled (a black cyst or a
   shadow at the edge of the fan), its border peeled (at most ``edge_ramp`` pixels) where it is
   only the blur ramp of the field of view's edge (below half the echo just inside: a blurred
   step's edge is at its half maximum), then minus the annotation pixels that lie inside (calipers,
   text written on the image), dilated by one pixel; solid marks (arrows) in a band along its
   edge (a wider top-hat there) are removed too.

Failures are properties of the input and raise :class:`ScanRegionError` with a one-line
reason: an all-black image, no component of at least ``min_fraction`` of the image, or a clip
whose frames change geometry (per-frame regions that disagree with the clip's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from anaus_core.maskers.base import SampleError

CODE_VERSION = "scan-region-2"  # 2: border at the half maximum of blurred edges


class ScanRegionError(SampleError):
    """No scan region can be found (black image, nothing that looks like echo data, a clip whose
    geometry changes); ``str(error)`` is the one-line reason."""


@dataclass(frozen=True)
class ScanRegionConfig:
    """Settings of the scan-region stage (all enter its fingerprint).

    ``enabled=False`` makes the region the whole image (the behaviour before scan regions).
    Lengths given as fractions are of the image's short side, so the settings do not depend on
    the stored size.
    """

    enabled: bool = True
    black_level: int = 10  # 3 x 3 medians at or below this (and pixels below twice it) are the black screen
    min_fraction: float = 0.05  # smallest region, as a fraction of the image
    annotation_level: int = 190  # annotation strokes are at least this bright
    annotation_contrast: int = 70  # ... and this much brighter than their surroundings (top-hat)
    stroke_radius: int = 2  # top-hat disk radius in pixels: strokes up to ~2r+1 px wide
    min_annotation_px: int = 6  # smaller candidate components are speckle peaks
    edge_band_fraction: float = 0.015  # solid marks within this band along the region edge are removed
    halo_radius: int = 3  # pixels around annotations that never join the region's foreground
    join_fraction: float = 0.025
    open_fraction: float = 0.012
    close_fraction: float = 0.03
    edge_ramp: int = 2  # the region's border is peeled at most this many pixels where it is a blur ramp ...
    edge_fraction: float = 0.5  # ... i.e. below this fraction of the echo just inside (half maximum)
    bite_fraction: float = 0.2  # dents of the convex hull up to this fraction of the region are filled
    min_motion: float = 2.0  # median temporal std (gray levels) above which a clip counts as live
    static_std: float = 0.75  # in a live clip, pixels whose std is below this are static
    max_frames: int = 48  # frames of a clip used (evenly spaced)
    geometry_iou: float = 0.85  # a frame whose own region has a lower IoU with the clip's: error

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "code_version": CODE_VERSION}


@dataclass
class ScanRegion:
    """``mask``: bool (H, W), True where echo data is. ``annotations``: bool (H, W), the
    annotation pixels found (inside or outside the region). ``info``: JSON-able facts (area
    fraction, bounding box, whether the clip was live)."""

    mask: np.ndarray
    annotations: np.ndarray
    info: dict[str, Any]


def _disk(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(0, int(radius))).astype(bool)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a Euclidean disk through a distance transform: O(pixels) whatever the
    radius (scipy's footprint morphology costs radius^2 per pixel; at 512 px the closings below
    dominated the stage)."""
    from scipy import ndimage

    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask) > radius


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing by a disk over a zero border wider than the radius: it neither erodes a region
    that touches the image edge (a linear probe's rectangle; a plain closing's border would)
    nor grows along the edge (as a replicated border would)."""
    pad = 2 * int(radius) + 1
    padded = np.pad(mask, pad, mode="constant")
    return _erode(_dilate(padded, radius), radius)[pad:-pad, pad:-pad]


def _opening(mask: np.ndarray, radius: int) -> np.ndarray:
    return _dilate(_erode(mask, radius), radius)


def _annotation_candidates(reference: np.ndarray, config: ScanRegionConfig, extra: np.ndarray | None) -> np.ndarray:
    from scipy import ndimage
    from skimage.morphology import white_tophat

    tophat = white_tophat(reference, footprint=_disk(config.stroke_radius))
    strokes = (reference >= config.annotation_level) & (tophat >= config.annotation_contrast)
    candidates = strokes if extra is None else strokes | extra
    if not candidates.any():
        return candidates
    # Join the strokes of one glyph (a gap of one pixel) before judging component sizes.
    joined = ndimage.binary_dilation(candidates, structure=np.ones((3, 3), bool))
    labels, count = ndimage.label(joined, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(candidates, labels, index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, bool)
    keep[1:] = sizes >= config.min_annotation_px
    core = candidates & keep[labels]
    if not core.any():
        return core
    # the anti-aliased / blurred rim of a mark: bright pixels within two pixels of its core
    rim = ndimage.binary_dilation(core, structure=_disk(2)) & (reference >= int(0.6 * config.annotation_level))
    return core | rim


def _region_of(reference: np.ndarray, annotations: np.ndarray, config: ScanRegionConfig) -> np.ndarray | None:
    """The region of one reference image, or None when nothing large enough is bright."""
    from scipy import ndimage

    height, width = reference.shape
    short = min(height, width)
    guard = ndimage.binary_dilation(annotations, structure=np.ones((3, 3), bool)) if annotations.any() else annotations
    # Speckle leaves many dark pixels inside tissue; a small closing joins them before the
    # opening cuts thin attachments (rulers, ticks) and removes isolated noise.
    # Resampling rings around glyphs and ruler lines (a few gray levels above black, up to
    # ~3 px out at 2x upsampling): such halos must not bridge the field of view to them.
    halo_guard = ndimage.binary_dilation(annotations, structure=_disk(config.halo_radius)) if annotations.any() else guard
    # Black screens carry noise a few gray levels up (JPEG, analogue capture): a pixel is bright
    # when its 3 x 3 median is above the black level, or it alone is well above it (sparse
    # speckle in dark tissue, which the closing below joins).
    smooth = ndimage.median_filter(reference, size=3, mode="nearest")
    bright = ((smooth > config.black_level) | (reference > 2 * config.black_level)) & ~halo_guard
    join_radius = max(1, int(round(config.join_fraction * short)))
    foreground = _closing(bright, join_radius) & ~halo_guard
    open_radius = int(round(config.open_fraction * short))
    if open_radius >= 1:
        foreground = _opening(foreground, open_radius)
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < config.min_fraction * height * width:
        return None
    region = ndimage.binary_fill_holes(labels == largest)
    close_radius = int(round(config.close_fraction * short))
    if close_radius >= 1:
        region = ndimage.binary_fill_holes(_closing(region, close_radius))
    region = _fill_bites(region, config)
    return _trim_edge_ramp(reference, region, config) & ~guard


def _trim_edge_ramp(reference: np.ndarray, region: np.ndarray, config: ScanRegionConfig) -> np.ndarray:
    """Put the region's border where the echo's edge is, not where the blur around it ends.

    A scan converter's interpolation (or a resize of the screen) smears the straight edge of the
    field of view into a ramp one or two pixels wide whose outer pixels are only a few gray
    levels above black; "above the black level" takes them, and the closings keep them. The
    edge of a blurred step is where it crosses half the level of the echo next to it, so a
    border pixel that is below ``edge_fraction`` of the mean echo just inside it, both itself
    and averaged along the border (where speckle averages out), is peeled off, at most
    ``edge_ramp`` pixels deep. The image's own edge is not a border (a linear probe's rectangle
    may fill the screen), and dark tissue at the edge of the fan (a shadow) loses at most
    ``edge_ramp`` pixels."""
    from scipy import ndimage

    if config.edge_ramp < 1 or config.edge_fraction <= 0:
        return region
    values = reference.astype(np.float32)
    cross = ndimage.generate_binary_structure(2, 1)
    window = 2 * config.edge_ramp + 3  # along the border: enough pixels to average speckle out

    def local_mean(where: np.ndarray, size: int) -> np.ndarray:
        weight = ndimage.uniform_filter(where.astype(np.float32), size=size, mode="constant")
        total = ndimage.uniform_filter(np.where(where, values, 0.0), size=size, mode="constant")
        return total / np.maximum(weight, 1e-6)

    trimmed = region.copy()
    for _ in range(config.edge_ramp):
        inner = ndimage.binary_erosion(np.pad(trimmed, 1, constant_values=True), structure=cross)[1:-1, 1:-1]
        border = trimmed & ~inner
        if not border.any():
            break
        # the echo just inside: the next two layers, over a window twice as wide
        deeper = ndimage.binary_erosion(np.pad(inner, 2, constant_values=True), structure=cross, iterations=2)[2:-2, 2:-2]
        echo = inner & ~deeper
        # dim itself (a bright pixel beside a dim stretch stays) and along its stretch of border
        # (one dark speckle on a bright edge stays)
        level = config.edge_fraction * local_mean(echo, 2 * window + 1)
        dim = border & (values < level) & (local_mean(border, window) < level)
        if not dim.any():
            break
        trimmed &= ~dim
    return trimmed


def _fill_bites(region: np.ndarray, config: ScanRegionConfig) -> np.ndarray:
    """Fill the dents that dark tissue at the edge (a cyst, a shadow) cuts into the field of
    view: parts of the convex hull missing from the region that are small (< ``bite_fraction``
    of it) and deep for their width (area >= 0.2 chord^2, a half disk has 0.39). The flat dent
    between a fan's top arc and its chord (<= 0.15 chord^2 for half angles up to 50 degrees) is
    left alone."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    hull = convex_hull_image(region)
    bites, count = ndimage.label(hull & ~region)
    if count == 0:
        return region
    area = np.count_nonzero(region)
    min_chord = 0.04 * min(region.shape)  # digitisation leaves slivers along straight edges
    filled = region.copy()
    for number, box in enumerate(ndimage.find_objects(bites), start=1):
        piece = bites[box] == number
        chord = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
        size = np.count_nonzero(piece)
        # a round dent (half a cyst: area ~ 0.4 chord^2) vs the flat lens of an arc (<= 0.15)
        if chord >= min_chord and size < config.bite_fraction * area and size >= 0.2 * chord * chord:
            filled[box] |= piece
    return filled


def _edge_marks(reference: np.ndarray, region: np.ndarray, annotations: np.ndarray, config: ScanRegionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Scanners put solid marks (focus arrows, depth markers) on the edge of the field of
    view, wider than a stroke: a wider top-hat, looked at only in a band along the region's
    edge (inside tissue it would take bright speckle), removes them from the region."""
    from scipy import ndimage
    from skimage.morphology import white_tophat

    band_width = max(2, int(round(config.edge_band_fraction * min(reference.shape))))
    band = region & ~_erode(np.pad(region, 1), band_width)[1:-1, 1:-1]  # the image edge counts as outside
    tophat = white_tophat(reference, footprint=_disk(band_width))
    marks = band & (reference >= config.annotation_level) & (tophat >= config.annotation_contrast)
    if not marks.any():
        return region, annotations
    labels, count = ndimage.label(marks, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.zeros(count + 1, bool)
    keep[1:] = sizes >= config.min_annotation_px
    marks = keep[labels]
    marks |= ndimage.binary_dilation(marks, structure=_disk(2)) & (reference >= int(0.6 * config.annotation_level))
    guard = ndimage.binary_dilation(marks, structure=np.ones((3, 3), bool))
    return region & ~guard, annotations | marks


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def detect_scan_region(
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    colour: np.ndarray | Sequence[np.ndarray | None] | None = None,
    config: ScanRegionConfig | None = None,
) -> ScanRegion:
    """The scan region of one image (``frames`` uint8 (H, W)) or one clip ((F, H, W), every
    frame the same size).

    ``colour``: optional bool (H, W) / (F, H, W) marking coloured pixels of the source (overlays
    drawn in colour on a gray image). Raises :class:`ScanRegionError` (black image, no region,
    geometry changing within the clip).
    """
    config = config or ScanRegionConfig()
    if isinstance(frames, np.ndarray) and frames.ndim == 2:
        frames = frames[None]
    shapes = {tuple(np.shape(f)) for f in frames}
    if len(shapes) != 1:
        raise ScanRegionError(f"frames change size within the clip ({', '.join(f'{w}x{h}' for h, w in sorted(shapes))}): geometry changes mid-clip")
    stack = np.asarray(frames if isinstance(frames, np.ndarray) else np.stack(list(frames)))
    if stack.dtype != np.uint8 or stack.ndim != 3 or stack.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (H, W) or (F, H, W), got {stack.dtype} {stack.shape}")
    height, width = stack.shape[1:]
    if not config.enabled:
        full = np.ones((height, width), bool)
        return ScanRegion(full, np.zeros((height, width), bool), _info(full, live=False, frames=len(stack)))
    chosen = np.unique(np.linspace(0, len(stack) - 1, min(len(stack), config.max_frames)).round().astype(int))
    sampled = stack[chosen]
    brightest = int(sampled.max())
    if brightest <= config.black_level:
        raise ScanRegionError(f"image is black (brightest pixel {brightest}): no echo data")
    reference = sampled.max(axis=0) if len(sampled) > 1 else sampled[0]
    extra = None
    if colour is not None:
        colour_stack = [c for c in (colour if not (isinstance(colour, np.ndarray) and colour.ndim == 2) else [colour]) if c is not None]
        if colour_stack:
            extra = np.any(np.stack([np.asarray(c, bool) for c in colour_stack]), axis=0)
    live = False
    if len(sampled) > 1:
        std = sampled.std(axis=0, dtype=np.float32)
        bright = reference > max(config.black_level * 4, 32)
        live = bool(bright.any() and float(np.median(std[bright])) >= config.min_motion)
        if live:
            static = (std < config.static_std) & (reference >= config.annotation_level)
            extra = static if extra is None else extra | static
    annotations = _annotation_candidates(reference, config, extra)
    region = _region_of(reference, annotations, config)
    if region is None:
        raise ScanRegionError(f"no scan region detected (no bright area of at least {config.min_fraction:.0%} of the image)")
    region, annotations = _edge_marks(reference, region, annotations, config)
    if len(sampled) > 1:
        _check_geometry(sampled, chosen, region, annotations, config)
    return ScanRegion(region, annotations, _info(region, live=live, frames=len(stack)))


def _check_geometry(sampled: np.ndarray, chosen: np.ndarray, region: np.ndarray, annotations: np.ndarray, config: ScanRegionConfig) -> None:
    """Each sampled frame's own region must agree with the clip's (a depth or probe change
    mid-clip moves the fan: one region cannot serve every frame)."""
    for frame_number, frame in zip(chosen, sampled):
        own = _region_of(frame, annotations, config)
        if own is None:
            continue  # a dark frame (freeze, transition) says nothing about the geometry
        iou = _iou(own, region)
        if iou < config.geometry_iou:
            raise ScanRegionError(
                f"scan geometry changes mid-clip: frame {int(frame_number)}'s region overlaps the clip's by IoU {iou:.2f} "
                f"(< {config.geometry_iou}); split the clip where the depth or probe changes"
            )


def _info(region: np.ndarray, *, live: bool, frames: int) -> dict[str, Any]:
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    bbox = [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1] if len(rows) else [0, 0, 0, 0]
    return {
        "area": int(np.count_nonzero(region)),
        "fraction": round(float(np.count_nonzero(region)) / region.size, 6),
        "bbox": bbox,  # top, left, bottom, right (exclusive)
        "live": live,
        "frames": int(frames),
    }


def region_overlap(region: np.ndarray, truth: np.ndarray, annotations: np.ndarray | None = None) -> dict[str, float]:
    """How well ``region`` matches a true field of view: ``coverage`` (fraction of the true
    field of view, minus annotation pixels, inside the region), ``outside`` (fraction of the
    pixels outside the field of view inside the region), ``annotations`` (fraction of the
    annotation pixels inside the region) and ``iou``."""
    region, truth = np.asarray(region, bool), np.asarray(truth, bool)
    annotations = np.zeros_like(truth) if annotations is None else np.asarray(annotations, bool)
    inside = truth & ~annotations
    outside = ~truth
    return {
        "coverage": float(np.count_nonzero(region & inside) / max(1, np.count_nonzero(inside))),
        "outside": float(np.count_nonzero(region & outside) / max(1, np.count_nonzero(outside))),
        "annotations": float(np.count_nonzero(region & annotations) / max(1, np.count_nonzero(annotations))),
        "iou": _iou(region, inside),
    }


__all__ = ["CODE_VERSION", "ScanRegion", "ScanRegionConfig", "ScanRegionError", "detect_scan_region", "region_overlap"]
