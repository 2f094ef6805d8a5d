"""Synthetic B-mode ultrasound phantoms: the embedded demo and test corpus.

Speckle from random scatterers convolved with a depth-dependent point-spread function
(Gaussian-modulated RF pulse along depth, focused Gaussian beam across), envelope detection,
attenuation with TGC, log compression; linear and sector (scan-converted fan) probes; labelled
cysts (posterior enhancement), hypo-/hyperechoic organs and bright layers (acoustic shadow).
See ``docs/phantoms.md``.
"""

from anaus_core.phantoms.corpus import make_phantom_corpus, phantom_id, read_sidecar, write_phantom
from anaus_core.phantoms.figure import contact_sheet, save_contact_sheet
from anaus_core.phantoms.overlays import AnnotatedPhantom, add_annotations
from anaus_core.phantoms.geometry import (
    DEPTH_STEP_REF,
    REFERENCE_SIZE,
    GEOMETRIES,
    BeamGrid,
    Fan,
    ScanGeometry,
    build_beam_grid,
    fan_mask,
    grid_unit_px,
    scan_convert,
)
from anaus_core.phantoms.phantom import (
    Acoustics,
    Phantom,
    generate_phantom,
    render_phantom,
    sample_acoustics,
    sample_geometry,
    scatterers_per_resolution_cell,
)
from anaus_core.phantoms.speckle import (
    RAYLEIGH_MEAN_OVER_STD,
    Beam,
    Pulse,
    beamform,
    log_compress,
    rayleigh_ratio,
    scatterer_field,
    simulate_envelope,
)
from anaus_core.phantoms.structures import KINDS, Band, Ellipse, Structure, paint_labels, sample_structures

__all__ = [
    "Acoustics",
    "AnnotatedPhantom",
    "add_annotations",
    "Band",
    "Beam",
    "BeamGrid",
    "DEPTH_STEP_REF",
    "REFERENCE_SIZE",
    "Ellipse",
    "Fan",
    "GEOMETRIES",
    "KINDS",
    "Phantom",
    "Pulse",
    "RAYLEIGH_MEAN_OVER_STD",
    "ScanGeometry",
    "Structure",
    "beamform",
    "build_beam_grid",
    "contact_sheet",
    "fan_mask",
    "generate_phantom",
    "grid_unit_px",
    "log_compress",
    "make_phantom_corpus",
    "paint_labels",
    "phantom_id",
    "rayleigh_ratio",
    "read_sidecar",
    "render_phantom",
    "sample_acoustics",
    "sample_geometry",
    "sample_structures",
    "save_contact_sheet",
    "scan_convert",
    "scatterer_field",
    "simulate_envelope",
    "write_phantom",
]
