"""One synthetic B-mode phantom: random probe geometry, structures and acoustics, rendered by the
speckle model on a beam grid, log-compressed and scan-converted to a square 8-bit image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from anaus_core.phantoms.geometry import (
    DEPTH_STEP_REF,
    GEOMETRIES,
    Fan,
    ScanGeometry,
    build_beam_grid,
    grid_unit_px,
    sample_on_grid,
    scan_convert,
)
from anaus_core.phantoms.speckle import Beam, Pulse, log_compress, simulate_envelope
from anaus_core.phantoms.structures import Structure, paint_labels, sample_structures

#: Decibels per neper of amplitude.
DB_PER_NEPER = 20.0 / math.log(10.0)

MIN_SIZE = 32


@dataclass(frozen=True)
class Acoustics:
    """Acoustic and display parameters of one phantom (lengths in reference pixels, i.e.
    1/256 of the image side; levels in dB relative to the echo of tissue at the surface).

    ``attenuation_db``: round-trip attenuation of tissue over the full depth of the field of
    view. ``falloff_db``: what time-gain compensation leaves of it (the image darkens by this
    much from top to bottom). ``noise_db``: receiver noise relative to the tissue echo at the
    deepest point, before gain (so noise shows in deep anechoic regions only).
    ``scatterer_density``: fraction of beam samples holding a scatterer.
    ``texture_db``: amplitude of slow echogenicity variations of the background tissue.
    """

    pulse: Pulse = field(default_factory=Pulse)
    beam_sigma_focus_px: float = 1.1
    focus_depth_frac: float = 0.5
    rayleigh_range_frac: float = 0.3
    attenuation_db: float = 40.0
    falloff_db: float = 6.0
    noise_db: float = -26.0
    dynamic_range_db: float = 55.0
    white_db: float = 24.0
    scatterer_density: float = 1.0
    texture_db: float = 1.5

    def to_dict(self) -> dict:
        return {key: (round(value, 4) if isinstance(value, float) else value) for key, value in _flat(asdict(self)).items()}


def _flat(values: dict) -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = float(value)
    return flat


def sample_acoustics(rng: np.random.Generator) -> Acoustics:
    """Per-image acoustic parameters: probe frequency/bandwidth, focus, attenuation and TGC,
    noise and display settings, each drawn from a realistic range."""
    return Acoustics(
        pulse=Pulse(carrier_period_px=float(rng.uniform(2.0, 2.8)), sigma_px=float(rng.uniform(1.1, 1.5))),
        beam_sigma_focus_px=float(rng.uniform(1.5, 2.3)),
        focus_depth_frac=float(rng.uniform(0.35, 0.65)),
        rayleigh_range_frac=float(rng.uniform(0.3, 0.5)),
        attenuation_db=float(rng.uniform(35.0, 45.0)),
        falloff_db=float(rng.uniform(3.0, 10.0)),
        noise_db=float(rng.uniform(-30.0, -22.0)),
        dynamic_range_db=float(rng.uniform(50.0, 60.0)),
        white_db=float(rng.uniform(24.0, 30.0)),
        scatterer_density=float(rng.uniform(0.6, 1.0)),
        texture_db=float(rng.uniform(0.5, 2.0)),
    )


def sample_geometry(kind: str, size: int, rng: np.random.Generator) -> ScanGeometry:
    """A linear probe, or a sector: a phased array (apex at the top edge, wide angle) or a
    convex probe (apex above the image, narrower angle, the fan starting lower)."""
    if kind == "linear":
        return ScanGeometry("linear", size)
    if kind != "sector":
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {kind!r}")
    apex_x = 0.5 * (size - 1)
    if rng.random() < 0.5:
        half_angle = float(rng.uniform(32.0, 45.0))
        apex_y = -float(rng.uniform(0.0, 0.04)) * size
        r_min = -apex_y / math.cos(math.radians(half_angle)) + float(rng.uniform(0.02, 0.05)) * size
    else:
        half_angle = float(rng.uniform(24.0, 34.0))
        apex_y = -float(rng.uniform(0.25, 0.45)) * size
        r_min = -apex_y / math.cos(math.radians(half_angle)) + float(rng.uniform(0.0, 0.03)) * size
    r_max = min(size - 1.0 - apex_y, (apex_x - 0.5) / math.sin(math.radians(half_angle)))
    return ScanGeometry("sector", size, Fan(apex_x, apex_y, r_min, r_max, half_angle))


@dataclass
class Phantom:
    """A rendered phantom.

    ``image``: uint8 ``(size, size)`` B-mode (0 outside a sector's fan). ``label``: uint8
    ``(size, size)`` id map (0 = background tissue and outside the fan, ``1..n`` =
    ``structures[i]["label"]``). ``structures``: JSON-ready dicts (label, kind, shape,
    echogenicity, attenuation, area_px). ``envelope``: float32 ``(size, size)`` pre-log
    envelope after TGC, scan-converted. ``beam_envelope``: float32 pre-log envelope on the beam
    grid's field of view (depth x lines), as simulated.
    """

    image: np.ndarray
    label: np.ndarray
    structures: list[dict]
    geometry: str
    fan: dict | None
    envelope: np.ndarray | None = None
    beam_envelope: np.ndarray | None = None
    acoustics: dict = field(default_factory=dict)

    def sidecar(self, *, id: str, seed: int, index: int) -> dict:
        """The JSON sidecar written next to the label PNG."""
        return {
            "id": id,
            "size": int(self.image.shape[0]),
            "seed": int(seed),
            "index": int(index),
            "geometry": self.geometry,
            "fan": self.fan,
            "structures": self.structures,
            "acoustics": self.acoustics,
        }


def render_phantom(
    *,
    geometry: ScanGeometry,
    structures: list[Structure],
    acoustics: Acoustics,
    rng: np.random.Generator,
) -> Phantom:
    """Simulate the echo of ``structures`` seen through ``geometry`` and return the phantom.

    Maps of echogenicity and attenuation are sampled on the beam grid from the label map;
    :func:`simulate_envelope` forms the speckle with the depth-dependent beam, attenuation
    accumulated along each beam, receiver noise and TGC; the envelope is log-compressed and
    scan-converted.
    """
    size = geometry.size
    unit = grid_unit_px(size)
    grid = build_beam_grid(geometry)
    labels = paint_labels(size, structures, geometry)
    beam_labels = sample_on_grid(labels, grid)

    echogenicity_of = np.ones(256, dtype=np.float32)
    attenuation_of = np.ones(256, dtype=np.float32)
    for structure in structures:
        echogenicity_of[structure.label] = structure.echogenicity
        attenuation_of[structure.label] = structure.attenuation
    echogenicity = echogenicity_of[beam_labels]
    if acoustics.texture_db > 0:
        echogenicity *= _tissue_texture(grid, acoustics.texture_db, rng)

    start, stop = geometry.depth_range
    extent = stop - start
    nepers_per_sample = acoustics.attenuation_db / DB_PER_NEPER * grid.depth_step / extent
    attenuation = attenuation_of[beam_labels] * np.float32(nepers_per_sample)

    pulse = Pulse(carrier_period_px=acoustics.pulse.carrier_period_px * unit, sigma_px=acoustics.pulse.sigma_px * unit)
    beam = Beam(
        sigma_focus_px=acoustics.beam_sigma_focus_px * unit,
        focus_depth_px=start + acoustics.focus_depth_frac * extent,
        rayleigh_range_px=acoustics.rayleigh_range_frac * extent,
    )
    # The beam width in lines; capped so the circular lateral convolution wraps only into the
    # margins (near a sector's apex the lines crowd together and the cap is reached).
    lateral_sigma_lines = np.minimum(
        beam.sigma_px(grid.depth) / grid.line_spacing_px().clip(1e-6), grid.narrowest_lateral_margin / 3.0
    )
    depth_from_start = np.clip(grid.depth - start, 0.0, None) / extent
    gain = np.exp((acoustics.attenuation_db - acoustics.falloff_db) / DB_PER_NEPER * depth_from_start)
    noise_rms = 10.0 ** ((acoustics.noise_db - acoustics.attenuation_db) / 20.0)

    envelope = simulate_envelope(
        echogenicity,
        lateral_sigma_lines=lateral_sigma_lines,
        pulse=pulse,
        rng=rng,
        density=acoustics.scatterer_density,
        attenuation=attenuation,
        noise_rms=noise_rms,
        gain=gain,
        step_px=grid.depth_step,
    )
    gray = log_compress(envelope, dynamic_range_db=acoustics.dynamic_range_db, white_db=acoustics.white_db)
    image = np.rint(scan_convert(gray, grid)).astype(np.uint8)

    areas = np.bincount(labels.ravel(), minlength=256)
    records = []
    for structure in structures:
        record = structure.to_dict()
        record["area_px"] = int(areas[structure.label])
        records.append(record)
    acoustics_record = acoustics.to_dict()
    acoustics_record["scatterers_per_cell"] = round(scatterers_per_resolution_cell(acoustics), 2)
    return Phantom(
        image=image,
        label=labels,
        structures=records,
        geometry=geometry.kind,
        fan=None if geometry.fan is None else geometry.fan.to_dict(),
        envelope=scan_convert(envelope, grid),
        beam_envelope=envelope[grid.field_of_view],
        acoustics=acoustics_record,
    )


def scatterers_per_resolution_cell(acoustics: Acoustics) -> float:
    """Mean number of scatterers inside one resolution cell at the focus (-6 dB pulse length
    times -6 dB beam width, in beam samples): >= 10 gives fully developed speckle."""
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0))
    cell = (fwhm * acoustics.pulse.sigma_px / DEPTH_STEP_REF) * (fwhm * acoustics.beam_sigma_focus_px)
    return acoustics.scatterer_density * cell


def _tissue_texture(grid, texture_db: float, rng: np.random.Generator) -> np.ndarray:
    """Slow multiplicative echogenicity variation of the tissue: a smooth random field on the
    beam grid (a few blobs across the image, about ``texture_db`` rms in dB), built separably as
    ``depth_basis @ coefficients @ lateral_basis.T`` from Gaussian bumps on a 6 x 6 lattice."""
    coefficients = rng.standard_normal((6, 6))
    depth_basis = _bump_basis(grid.depth.size, 6)
    lateral_basis = _bump_basis(grid.lateral.size, 6)
    # Unit coefficients give a field of about 1.34 dB rms on this basis (measured over many
    # draws); scaling the coefficients avoids computing the std of every field.
    field_db = (depth_basis @ (coefficients * (texture_db / 1.34)) @ lateral_basis.T).astype(np.float32)
    field_db *= np.float32(math.log(10.0) / 10.0)
    return np.exp(field_db, out=field_db)


def _bump_basis(n: int, count: int) -> np.ndarray:
    """``(n, count)`` Gaussian bumps evenly spread over ``n`` samples (width = spacing)."""
    position = np.linspace(0.0, count - 1.0, n)[:, None]
    return np.exp(-0.5 * (position - np.arange(count)[None, :]) ** 2)


def generate_phantom(*, size: int, seed: int, geometry: str | None = None, index: int = 0) -> Phantom:
    """Phantom number ``index`` of the corpus with ``seed``: all its randomness comes from
    ``np.random.SeedSequence([seed, index])``. ``geometry`` ``None`` alternates linear (even
    index) and sector (odd index)."""
    if size < MIN_SIZE:
        raise ValueError(f"phantom size must be at least {MIN_SIZE} px, got {size}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    kind = geometry if geometry is not None else GEOMETRIES[index % 2]
    scan = sample_geometry(kind, int(size), rng)
    structures = sample_structures(scan, rng)
    acoustics = sample_acoustics(rng)
    return render_phantom(geometry=scan, structures=structures, acoustics=acoustics, rng=rng)
