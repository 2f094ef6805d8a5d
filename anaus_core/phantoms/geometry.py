"""Scan geometries of the phantoms: the linear (rectangular) and sector (fan) beam grids, the
fan mask, and scan conversion from the beam grid to image pixels.

Coordinates are in output-image pixels: pixel ``(row, col)`` has its centre at ``x = col``,
``y = row``; depth grows downwards. A sector's angle ``theta`` is measured from the downward
vertical through the apex, positive towards larger ``x``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import scipy.fft

#: Image side at which the acoustic model's lengths are given ("reference pixels").
REFERENCE_SIZE = 256

#: Depth sample spacing in reference pixels. Two samples per pixel keep the RF carrier (period
#: >= 2 reference px) below the Nyquist limit of the RF line.
DEPTH_STEP_REF = 0.5

GEOMETRIES = ("linear", "sector")


@dataclass(frozen=True)
class Fan:
    """A sector field of view, in pixels of the output image.

    The fan is the set of points at distance ``r_min <= r <= r_max`` from the apex
    ``(apex_x, apex_y)`` whose angle from the downward vertical is at most ``half_angle_deg``.
    A phased array has its apex at (or just above) the top edge; a convex probe has it well
    above the image with a larger ``r_min``.
    """

    apex_x: float
    apex_y: float
    r_min: float
    r_max: float
    half_angle_deg: float

    def to_dict(self) -> dict:
        return {
            "apex_x": round(float(self.apex_x), 4),
            "apex_y": round(float(self.apex_y), 4),
            "r_min": round(float(self.r_min), 4),
            "r_max": round(float(self.r_max), 4),
            "half_angle_deg": round(float(self.half_angle_deg), 4),
        }

    @classmethod
    def from_dict(cls, fan: Mapping) -> "Fan":
        return cls(**{key: float(fan[key]) for key in ("apex_x", "apex_y", "r_min", "r_max", "half_angle_deg")})


@dataclass(frozen=True)
class ScanGeometry:
    """The probe geometry of one phantom: ``kind`` is ``"linear"`` (the image is the beam
    grid) or ``"sector"`` (``fan`` gives the field of view inside the square image)."""

    kind: str
    size: int
    fan: Fan | None = None

    def __post_init__(self) -> None:
        if self.kind not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.kind!r}")
        if (self.kind == "sector") != (self.fan is not None):
            raise ValueError("a sector geometry needs a fan, a linear one must not have one")

    @property
    def depth_range(self) -> tuple[float, float]:
        """First and last depth of the field of view along the beam, in pixels."""
        if self.fan is None:
            return 0.0, float(self.size - 1)
        return self.fan.r_min, self.fan.r_max

    def to_beam_coordinates(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cartesian pixel coordinates -> (lateral, depth): ``(x, y)`` for a linear probe,
        ``(theta in radians, r)`` for a sector."""
        if self.fan is None:
            return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        dx = np.asarray(x, dtype=np.float64) - self.fan.apex_x
        dy = np.asarray(y, dtype=np.float64) - self.fan.apex_y
        return np.arctan2(dx, dy), np.hypot(dx, dy)

    def from_unit_beam(self, u: float, v: float) -> tuple[float, float]:
        """A point given as fractions of the field of view (``u`` across the beams, ``v`` down
        the depth, both in [0, 1]) -> Cartesian pixel coordinates ``(x, y)``."""
        if self.fan is None:
            return u * (self.size - 1), v * (self.size - 1)
        theta = (2.0 * u - 1.0) * math.radians(self.fan.half_angle_deg)
        r = self.fan.r_min + v * (self.fan.r_max - self.fan.r_min)
        return self.fan.apex_x + r * math.sin(theta), self.fan.apex_y + r * math.cos(theta)

    def beam_direction_deg(self, x: float, y: float) -> float:
        """Angle (degrees, image axes) of the beam through ``(x, y)``: 0 for a linear probe."""
        if self.fan is None:
            return 0.0
        return math.degrees(math.atan2(x - self.fan.apex_x, y - self.fan.apex_y))


def fan_mask(size: int, fan: Fan | Mapping | None) -> np.ndarray:
    """Bool ``(size, size)``: True inside the field of view. ``fan`` is a :class:`Fan`, the
    ``"fan"`` entry of a phantom's JSON sidecar, or ``None`` (linear probe: all True)."""
    if fan is None:
        return np.ones((size, size), dtype=bool)
    if not isinstance(fan, Fan):
        fan = Fan.from_dict(fan)
    theta, r = _pixel_polar(size, fan)
    return (r >= fan.r_min) & (r <= fan.r_max) & (np.abs(theta) <= math.radians(fan.half_angle_deg))


@functools.lru_cache(maxsize=8)
def _pixel_polar(size: int, fan: Fan) -> tuple[np.ndarray, np.ndarray]:
    """(theta, r) of every pixel centre, cached (read-only) because a phantom needs them for
    the fan mask, the layout and scan conversion."""
    coords = np.arange(size, dtype=np.float64)
    dx = coords[None, :] - fan.apex_x
    dy = coords[:, None] - fan.apex_y
    theta, r = np.arctan2(dx, dy), np.hypot(dx, dy)
    theta.flags.writeable = False
    r.flags.writeable = False
    return theta, r


def grid_unit_px(size: int) -> float:
    """Output pixels per reference pixel: lengths of the acoustic model (pulse, beam width,
    sample spacing) are given for a ``REFERENCE_SIZE`` image and scale with the image, so a
    phantom of any size shows the same anatomy at the same resolution (like a resized scan)."""
    return size / REFERENCE_SIZE


@dataclass(frozen=True)
class BeamGrid:
    """The grid the echo is simulated on: ``depth`` samples (``depth_step`` pixels apart) along
    each of ``lateral`` beam lines (x in pixels for a linear probe, angle in radians for a
    sector). Both axes carry margins (``depth_margin`` samples, ``lateral_margin`` lines each
    side) so that the FFT convolutions wrap only into samples that are cropped away."""

    geometry: ScanGeometry
    depth: np.ndarray
    lateral: np.ndarray
    depth_margin: int
    lateral_margin: int
    fov_depth: int
    fov_lines: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.size, self.lateral.size

    @property
    def depth_step(self) -> float:
        return float(self.depth[1] - self.depth[0])

    @property
    def lateral_step(self) -> float:
        return float(self.lateral[1] - self.lateral[0])

    @property
    def narrowest_lateral_margin(self) -> int:
        """Lines of margin on the narrower side (the wider beam must stay well inside it)."""
        return min(self.lateral_margin, self.lateral.size - self.lateral_margin - self.fov_lines)

    @property
    def field_of_view(self) -> tuple[slice, slice]:
        """Index of the grid without its margins."""
        return (
            slice(self.depth_margin, self.depth_margin + self.fov_depth),
            slice(self.lateral_margin, self.lateral_margin + self.fov_lines),
        )

    def cartesian(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates ``(x, y)``, each ``(n_depth, n_lines)``, of every beam sample."""
        if self.geometry.fan is None:
            return np.broadcast_to(self.lateral[None, :], self.shape), np.broadcast_to(self.depth[:, None], self.shape)
        fan = self.geometry.fan
        return (
            fan.apex_x + self.depth[:, None] * np.sin(self.lateral)[None, :],
            fan.apex_y + self.depth[:, None] * np.cos(self.lateral)[None, :],
        )

    def line_spacing_px(self) -> np.ndarray:
        """``(n_depth,)``: distance in pixels between neighbouring beam lines at each depth."""
        if self.geometry.fan is None:
            return np.full(self.depth.size, self.lateral_step)
        return np.abs(self.depth) * abs(self.lateral_step)


def build_beam_grid(geometry: ScanGeometry, *, depth_margin: int = 14, lateral_margin: int = 18) -> BeamGrid:
    """The beam grid covering ``geometry``'s field of view plus at least the given margins:
    depth samples ``DEPTH_STEP_REF`` reference pixels apart, lines one reference pixel apart
    (for a sector, at its deepest point). The grid has about the same number of samples for
    every image size; margins are widened so both axes have FFT-friendly (5-smooth) lengths."""
    unit = grid_unit_px(geometry.size)
    depth_step = DEPTH_STEP_REF * unit
    start, stop = geometry.depth_range
    fov_depth = int(math.ceil((stop - start) / depth_step)) + 1
    before, after = _margins(fov_depth, depth_margin)
    depth = start + depth_step * np.arange(-before, fov_depth + after)
    if geometry.fan is None:
        fov_lines = max(16, int(math.ceil((geometry.size - 1) / unit))) + 1
        step = (geometry.size - 1) / (fov_lines - 1)
        first = 0.0
    else:
        half = math.radians(geometry.fan.half_angle_deg)
        fov_lines = max(16, int(math.ceil(2.0 * half * geometry.fan.r_max / unit))) + 1
        step = 2.0 * half / (fov_lines - 1)
        first = -half
    left, right = _margins(fov_lines, lateral_margin)
    lateral = first + step * np.arange(-left, fov_lines + right)
    return BeamGrid(geometry, depth, lateral, before, left, fov_depth, fov_lines)


def _margins(n_fov: int, margin: int) -> tuple[int, int]:
    """(before, after) margins of at least ``margin`` making ``n_fov`` + margins 5-smooth."""
    total = scipy.fft.next_fast_len(n_fov + 2 * margin, real=True)
    before = (total - n_fov) // 2
    return before, total - n_fov - before


def scan_convert(values: np.ndarray, grid: BeamGrid) -> np.ndarray:
    """Beam-grid ``values`` ``(n_depth, n_lines)`` -> float32 ``(size, size)`` image: bilinear
    interpolation at each pixel's beam coordinates ((x, y) for a linear probe, (theta, r) for a
    sector), 0 outside a sector's fan."""
    inside, flat_index, weights = _interpolation_table(grid)
    flat = np.asarray(values, dtype=np.float32).ravel()
    n_lines = grid.lateral.size
    corners = (
        flat[flat_index] * weights[0]
        + flat[flat_index + 1] * weights[1]
        + flat[flat_index + n_lines] * weights[2]
        + flat[flat_index + n_lines + 1] * weights[3]
    )
    size = grid.geometry.size
    if inside is None:
        return corners.reshape(size, size)
    image = np.zeros((size, size), dtype=np.float32)
    image[inside] = corners
    return image


def _interpolation_table(grid: BeamGrid) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Bilinear scan-conversion table: the pixels inside the field of view (``None``: all),
    the flat index of the beam sample at the upper-left of each, and the four corner weights.
    Cached per grid because every phantom converts two maps (image and envelope)."""
    cache_key = (grid.geometry, grid.depth.size, grid.lateral.size, grid.depth_margin, grid.lateral_margin)
    cached = _TABLES.get(cache_key)
    if cached is not None:
        return cached
    size = grid.geometry.size
    fan = grid.geometry.fan
    if fan is None:
        inside = None
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        lateral, depth = x.ravel(), y.ravel()
    else:
        theta, r = _pixel_polar(size, fan)
        inside = (r >= fan.r_min) & (r <= fan.r_max) & (np.abs(theta) <= math.radians(fan.half_angle_deg))
        lateral, depth = theta[inside], r[inside]
    depth_index = (depth - grid.depth[0]) / grid.depth_step
    line_index = (lateral - grid.lateral[0]) / grid.lateral_step
    # The field of view lies inside the grid's margins: every pixel has four neighbours.
    depth_floor = np.clip(np.floor(depth_index).astype(np.intp), 0, grid.depth.size - 2)
    line_floor = np.clip(np.floor(line_index).astype(np.intp), 0, grid.lateral.size - 2)
    fd = (depth_index - depth_floor).astype(np.float32)
    fl = (line_index - line_floor).astype(np.float32)
    weights = np.stack([(1 - fd) * (1 - fl), (1 - fd) * fl, fd * (1 - fl), fd * fl])
    table = (inside, depth_floor * grid.lateral.size + line_floor, weights)
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[cache_key] = table
    return table


_TABLES: dict = {}


def sample_on_grid(image: np.ndarray, grid: BeamGrid, *, cval: float = 0) -> np.ndarray:
    """An image-plane map ``(size, size)`` sampled (nearest pixel) at every beam sample ->
    ``(n_depth, n_lines)``; ``cval`` where the sample falls outside the image."""
    size = image.shape[0]
    padded = np.pad(image, 1, constant_values=cval)
    if grid.geometry.fan is None:
        rows = np.clip(np.rint(grid.depth).astype(np.intp), -1, size)[:, None]
        cols = np.clip(np.rint(grid.lateral).astype(np.intp), -1, size)[None, :]
    else:
        x, y = grid.cartesian()
        rows = np.clip(np.rint(y).astype(np.intp), -1, size)
        cols = np.clip(np.rint(x).astype(np.intp), -1, size)
    return padded[rows + 1, cols + 1]
