"""Anatomical structures of a phantom: shapes, their acoustic properties, random layouts and the
label map.

Kinds (the JSON sidecar's ``kind``):

* ``cyst``: anechoic fluid (echogenicity 0) that barely attenuates, so the tissue below it is
  brighter than beside it (posterior enhancement). Near-elliptic.
* ``hypo`` / ``hyper``: organs or lesions darker / brighter than the surrounding tissue, with
  tissue-like attenuation. Ellipses with a wavy boundary.
* ``layer``: a bright, strongly attenuating band (bone surface, calcified plate) that casts an
  acoustic shadow along the beams below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from anaus_core.phantoms.geometry import REFERENCE_SIZE, ScanGeometry, fan_mask

KINDS = ("cyst", "hypo", "hyper", "layer")

#: Smallest cyst semi-axis in reference pixels (1/256 of the image side): a few beam widths,
#: so that the point-spread function does not fill the cyst in.
MIN_CYST_RADIUS_REF = 10.0


class Shape(Protocol):
    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...

    def bbox(self) -> tuple[float, float, float, float]: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class Ellipse:
    """An ellipse with centre ``(cx, cy)``, semi-axes ``a`` (along ``angle_deg``) and ``b``; its
    boundary radius is modulated by ``1 + sum(amp * cos(k * phi + phase))`` over
    ``harmonics`` ``(k, amp, phase)`` to make organ-like outlines."""

    cx: float
    cy: float
    a: float
    b: float
    angle_deg: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        angle = math.radians(self.angle_deg)
        dx, dy = x - self.cx, y - self.cy
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / self.a
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / self.b
        rho2 = u * u + v * v
        if not self.harmonics:
            return rho2 <= 1.0
        phi = np.arctan2(v, u)
        boundary = np.ones_like(phi)
        for k, amp, phase in self.harmonics:
            boundary += amp * np.cos(k * phi + phase)
        return rho2 <= boundary * boundary

    def bbox(self) -> tuple[float, float, float, float]:
        reach = max(self.a, self.b) * (1.0 + sum(abs(amp) for _, amp, _ in self.harmonics))
        return self.cx - reach, self.cx + reach, self.cy - reach, self.cy + reach

    def to_dict(self) -> dict:
        return {
            "type": "ellipse",
            "center": [round(self.cx, 3), round(self.cy, 3)],
            "axes": [round(self.a, 3), round(self.b, 3)],
            "angle_deg": round(self.angle_deg, 3),
            "harmonics": [[int(k), round(amp, 4), round(phase, 4)] for k, amp, phase in self.harmonics],
        }


@dataclass(frozen=True)
class Band:
    """A bent band of ``length`` and ``half_thickness`` centred at ``(cx, cy)`` and oriented
    along ``angle_deg``; its centre line bows by ``bend`` pixels at the middle, and its ends
    are rounded off."""

    cx: float
    cy: float
    length: float
    half_thickness: float
    angle_deg: float = 0.0
    bend: float = 0.0

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        angle = math.radians(self.angle_deg)
        dx, dy = x - self.cx, y - self.cy
        along = dx * math.cos(angle) + dy * math.sin(angle)
        across = -dx * math.sin(angle) + dy * math.cos(angle)
        t = np.clip(along / self.length + 0.5, 0.0, 1.0)
        centre = self.bend * 4.0 * t * (1.0 - t)
        half = self.half_thickness * np.sqrt(1.0 - (2.0 * t - 1.0) ** 8)
        return (np.abs(along) <= 0.5 * self.length) & (np.abs(across - centre) <= half)

    def bbox(self) -> tuple[float, float, float, float]:
        reach = 0.5 * self.length + self.half_thickness + abs(self.bend)
        return self.cx - reach, self.cx + reach, self.cy - reach, self.cy + reach

    def to_dict(self) -> dict:
        return {
            "type": "band",
            "center": [round(self.cx, 3), round(self.cy, 3)],
            "length": round(self.length, 3),
            "half_thickness": round(self.half_thickness, 3),
            "angle_deg": round(self.angle_deg, 3),
            "bend": round(self.bend, 3),
        }


@dataclass(frozen=True)
class Structure:
    """One labelled structure: its ``label`` id (>= 1), ``kind`` (see :data:`KINDS`), shape,
    mean backscattered intensity ``echogenicity`` (linear, tissue = 1) and ``attenuation``
    per unit path relative to tissue."""

    label: int
    kind: str
    shape: Ellipse | Band
    echogenicity: float
    attenuation: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structure kind must be one of {KINDS}, got {self.kind!r}")
        if not 1 <= self.label <= 255:
            raise ValueError(f"structure label must be in 1..255, got {self.label}")

    def mask(self, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """``(window, mask)``: the pixel window around the shape and a bool mask inside it."""
        x0, x1, y0, y1 = self.shape.bbox()
        rows = slice(max(0, int(math.floor(y0))), min(size, int(math.ceil(y1)) + 1))
        cols = slice(max(0, int(math.floor(x0))), min(size, int(math.ceil(x1)) + 1))
        y = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
        x = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :]
        return (rows, cols), self.shape.contains(x, y)

    def to_dict(self) -> dict:
        echogenicity_db = 10.0 * math.log10(self.echogenicity) if self.echogenicity > 0 else None
        return {
            "label": int(self.label),
            "kind": self.kind,
            "shape": self.shape.to_dict(),
            "echogenicity": round(float(self.echogenicity), 5),
            "echogenicity_db": None if echogenicity_db is None else round(echogenicity_db, 3),
            "attenuation": round(float(self.attenuation), 4),
        }


def paint_labels(size: int, structures: list[Structure], geometry: ScanGeometry) -> np.ndarray:
    """uint8 ``(size, size)`` id map: 0 = background tissue (and everything outside the fan),
    else the label of the first structure covering the pixel."""
    labels = np.zeros((size, size), dtype=np.uint8)
    for structure in structures:
        window, mask = structure.mask(size)
        region = labels[window]
        region[mask & (region == 0)] = structure.label
    if geometry.fan is not None:
        labels[~fan_mask(size, geometry.fan)] = 0
    return labels


# --- random layouts -------------------------------------------------------------------------


def _kind_properties(kind: str, rng: np.random.Generator) -> tuple[float, float]:
    """(echogenicity, relative attenuation) drawn for one structure of ``kind``."""
    if kind == "cyst":
        return 0.0, float(rng.uniform(0.02, 0.1))
    if kind == "hypo":
        return float(10.0 ** (rng.uniform(-12.0, -6.0) / 10.0)), float(rng.uniform(0.7, 1.0))
    if kind == "hyper":
        return float(10.0 ** (rng.uniform(6.0, 11.0) / 10.0)), float(rng.uniform(1.1, 1.5))
    return float(10.0 ** (rng.uniform(12.0, 18.0) / 10.0)), float(rng.uniform(6.0, 12.0))


def _sample_shape(kind: str, geometry: ScanGeometry, rng: np.random.Generator, scale: float) -> Ellipse | Band:
    size = geometry.size
    start, stop = geometry.depth_range
    depth = stop - start
    if kind == "layer":
        cx, cy = geometry.from_unit_beam(rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.45))
        tilt = rng.uniform(-12.0, 12.0)
        return Band(
            cx=cx,
            cy=cy,
            length=scale * size * rng.uniform(0.15, 0.4),
            half_thickness=max(1.5, depth * rng.uniform(0.010, 0.020)),
            angle_deg=-geometry.beam_direction_deg(cx, cy) + tilt,
            bend=float(rng.choice([-1.0, 1.0])) * depth * rng.uniform(0.0, 0.05),
        )
    if kind == "cyst":
        cx, cy = geometry.from_unit_beam(rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.7))
        # Never much smaller than the beam, or the point-spread function would fill the cyst in.
        smallest = MIN_CYST_RADIUS_REF * size / REFERENCE_SIZE
        a = max(smallest, scale * size * rng.uniform(0.05, 0.11))
        b = max(smallest, a * rng.uniform(0.7, 1.0))
        harmonics = ((3, float(rng.uniform(0.0, 0.03)), float(rng.uniform(0, 2 * math.pi))),)
    else:
        cx, cy = geometry.from_unit_beam(rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.85))
        a = max(3.0, scale * size * rng.uniform(0.08, 0.18))
        b = a * rng.uniform(0.45, 0.9)
        harmonics = tuple(
            (k, float(rng.uniform(0.02, 0.08)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 5)
        )
    return Ellipse(cx=cx, cy=cy, a=a, b=b, angle_deg=float(rng.uniform(-90.0, 90.0)), harmonics=harmonics)


def _beam_extent(geometry: ScanGeometry, window: tuple[slice, slice], mask: np.ndarray) -> tuple[float, float, float, float]:
    """(lateral min, lateral max, depth min, depth max) of a mask in beam coordinates."""
    rows, cols = np.nonzero(mask)
    lateral, depth = geometry.to_beam_coordinates(cols + window[1].start, rows + window[0].start)
    return float(lateral.min()), float(lateral.max()), float(depth.min()), float(depth.max())


def _draw_kinds(rng: np.random.Generator) -> list[str]:
    """3-6 kinds, at most one layer, always at least one cyst and one hypo- or hyperechoic
    organ; layers first (cysts avoid their shadows), then organs, then cysts."""
    count = int(rng.integers(3, 7))
    kinds = ["layer"] if rng.random() < 0.65 else []
    kinds += ["cyst", str(rng.choice(["hypo", "hyper"]))]
    while len(kinds) < count:
        kinds.append(str(rng.choice(["cyst", "hypo", "hyper"], p=[0.3, 0.35, 0.35])))
    order = {"layer": 0, "hypo": 1, "hyper": 1, "cyst": 2}
    return sorted(kinds, key=order.__getitem__)


def sample_structures(geometry: ScanGeometry, rng: np.random.Generator, *, max_tries: int = 40) -> list[Structure]:
    """A random layout of 3-6 non-overlapping structures inside the field of view.

    Each structure is redrawn (shrinking a little each time) until it lies at least 90 %
    inside the field of view, keeps a gap from earlier structures and, for cysts, stays out of
    the shadow below a layer (so that the cyst and its posterior enhancement remain visible).
    A structure that cannot be placed after ``max_tries`` draws is dropped.
    """
    size = geometry.size
    inside_view = fan_mask(size, geometry.fan)
    occupied = np.zeros((size, size), dtype=bool)
    gap = max(2, size // 64)
    shadows: list[tuple[float, float, float]] = []
    structures: list[Structure] = []
    for wanted in _draw_kinds(rng):
        # A kind that does not fit (a cyst with no room outside the shadows, say) is replaced
        # once by an organ so that the image keeps its number of structures.
        for kind in (wanted, str(rng.choice(["hypo", "hyper"]))):
            placed = _place(kind, geometry, rng, structures, occupied, inside_view, shadows, gap, max_tries)
            if placed:
                break
    return structures


def _place(
    kind: str,
    geometry: ScanGeometry,
    rng: np.random.Generator,
    structures: list[Structure],
    occupied: np.ndarray,
    inside_view: np.ndarray,
    shadows: list[tuple[float, float, float]],
    gap: int,
    max_tries: int,
) -> bool:
    size = geometry.size
    for attempt in range(max_tries):
        scale = 0.95**attempt
        shape = _sample_shape(kind, geometry, rng, scale)
        echogenicity, attenuation = _kind_properties(kind, rng)
        centre_row, centre_col = int(round(shape.cy)), int(round(shape.cx))
        if not (0 <= centre_row < size and 0 <= centre_col < size) or occupied[centre_row, centre_col]:
            continue
        candidate = Structure(len(structures) + 1, kind, shape, echogenicity, attenuation)
        window, mask = candidate.mask(size)
        area = int(mask.sum())
        if area < 12 or occupied[window][mask].any() or inside_view[window][mask].sum() < 0.9 * area:
            continue
        lateral_min, lateral_max, depth_min, depth_max = _beam_extent(geometry, window, mask)
        if kind == "cyst" and any(
            lateral_max >= s_min and lateral_min <= s_max and depth_max >= s_depth for s_min, s_max, s_depth in shadows
        ):
            continue
        if kind == "layer":
            pad = 0.05 * (lateral_max - lateral_min)
            shadows.append((lateral_min - pad, lateral_max + pad, depth_min))
        _mark_occupied(occupied, window, mask, gap)
        structures.append(candidate)
        return True
    return False


def _mark_occupied(occupied: np.ndarray, window: tuple[slice, slice], mask: np.ndarray, gap: int) -> None:
    """Add ``mask`` grown by ``gap`` pixels to ``occupied`` (dilating only a local window)."""
    size = occupied.shape[0]
    rows, cols = window
    r0, r1 = max(0, rows.start - gap), min(size, rows.stop + gap)
    c0, c1 = max(0, cols.start - gap), min(size, cols.stop + gap)
    local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    local[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] = mask
    occupied[r0:r1, c0:c1] |= ndimage.binary_dilation(local, iterations=gap)
