"""Writing a phantom corpus to disk: ``img/<id>.png``, ``label/<id>.png`` and
``label/<id>.json`` per phantom; with annotations also ``truth/<id>_fov.png`` (the true field
of view) and ``truth/<id>_overlay.png`` (the burned-in annotation pixels), 0/255 each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.phantoms.phantom import MIN_SIZE, Phantom, generate_phantom

MAX_SIZE = 4096
LABELS_MARKER = ".anaus-labels"  # the same name as pipeline.ingest.LABELS_MARKER (tests/test_harden.py checks)


def _refuse_other_size(out_dir: Path, size: int) -> None:
    """A corpus folder holding phantoms of another size is not silently overwritten: mixed
    sizes in one corpus are a mistake (a different seed or count at the same size is fine)."""
    existing = sorted((out_dir / "img").glob("phantom_*.png"))[:1] if (out_dir / "img").is_dir() else []
    for path in existing:
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except OSError:
            continue
        if (width, height) != (size, size):
            raise UserInputError(f"{out_dir}: holds {width}x{height} phantoms; refusing to overwrite them with --size {size} "
                                 "(use another folder or delete it first)")


def phantom_id(index: int) -> str:
    """The corpus id of phantom ``index``: ``phantom_00042`` (dot-free, sorts by index)."""
    return f"phantom_{index:05d}"


def write_phantom(out_dir: Path, phantom_key: str, phantom: Phantom, *, seed: int, index: int, annotations: bool = False) -> None:
    """Write one phantom's image PNG, label PNG and JSON sidecar under ``out_dir``; with
    ``annotations`` the image is an RGB screen with burned-in overlays
    (``anaus_core.phantoms.overlays``) and the truth masks go to ``truth/``."""
    sidecar = phantom.sidecar(id=phantom_key, seed=seed, index=index)
    if annotations:
        from anaus_core.phantoms.overlays import add_annotations

        # its own random stream: the phantom itself is the same with or without overlays
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0xA770]))
        screen = add_annotations(phantom.image, phantom.label, phantom.fan, rng)
        Image.fromarray(screen.rgb, mode="RGB").save(out_dir / "img" / f"{phantom_key}.png")
        Image.fromarray(screen.label, mode="L").save(out_dir / "label" / f"{phantom_key}.png")
        (out_dir / "truth").mkdir(exist_ok=True)
        (out_dir / "truth" / LABELS_MARKER).write_text("truth masks of a phantom corpus; not ingested as images\n")
        fov_name, overlay_name = f"truth/{phantom_key}_fov.png", f"truth/{phantom_key}_overlay.png"
        Image.fromarray(screen.field_of_view.astype(np.uint8) * 255, mode="L").save(out_dir / fov_name)
        Image.fromarray(screen.overlay.astype(np.uint8) * 255, mode="L").save(out_dir / overlay_name)
        sidecar["annotations"] = {"items": screen.items, "field_of_view_png": fov_name, "overlay_png": overlay_name}
    else:
        Image.fromarray(phantom.image, mode="L").save(out_dir / "img" / f"{phantom_key}.png")
        Image.fromarray(phantom.label, mode="L").save(out_dir / "label" / f"{phantom_key}.png")
    (out_dir / "label" / f"{phantom_key}.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def make_phantom_corpus(out_dir, *, count: int, size: int, seed: int, progress: bool = False, annotations: bool = False,
                        geometry: str | None = None) -> list[str]:
    """Generate ``count`` phantoms of ``size`` x ``size`` pixels into ``out_dir`` and return
    their ids (``phantom_00000``, ...).

    Phantom ``i`` depends only on ``(seed, i, size)``: a larger ``count`` adds images without
    changing the first ones. Even indices use a linear probe, odd ones a sector (``geometry``
"linear" or "sector" makes them all one kind). ``annotations`` burns in text, a depth
ruler, calipers, a colour bar and a logo (``write_phantom``). Existing files
    with the same names are overwritten. Bad arguments raise :class:`UserInputError`.
    """
    out_dir = Path(out_dir)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise UserInputError(f"--count: must be an integer >= 1, got {count!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserInputError(f"--size: must be an integer in {MIN_SIZE}..{MAX_SIZE} pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"--seed: must be a non-negative integer, got {seed!r}")
    if geometry is not None and geometry not in ("linear", "sector"):
        raise UserInputError(f"--geometry: must be linear or sector, got {geometry!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: exists and is not a directory")
    _refuse_other_size(out_dir, int(size))
    for sub in ("img", "label"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    # declares label/ a label folder: `precompute-masks CORPUS` then ingests img/ only (pipeline.ingest)
    (out_dir / "label" / LABELS_MARKER).write_text("label images of a phantom corpus; not ingested as images\n")

    ids = [phantom_id(index) for index in range(count)]
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        columns = (TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        from anaus_core.progress import make_progress

        with make_progress(*columns) as bar:
            task = bar.add_task("phantoms", total=count)
            for index, key in enumerate(ids):
                write_phantom(out_dir, key, generate_phantom(size=int(size), seed=int(seed), index=index, geometry=geometry), seed=int(seed), index=index, annotations=annotations)
                bar.advance(task)
    else:
        for index, key in enumerate(ids):
            write_phantom(out_dir, key, generate_phantom(size=int(size), seed=int(seed), index=index, geometry=geometry), seed=int(seed), index=index, annotations=annotations)
    return ids


def read_sidecar(path) -> dict:
    """Load a phantom's JSON sidecar (``label/<id>.json``)."""
    return json.loads(Path(path).read_text())
