"""``anaus lpsam predict``: mask sets of image files written as npz + JSON (+ PNG overlays)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.image_limits import read_bounded_image
from anaus_core.lpsam.data import IMAGE_SUFFIXES
from anaus_core.lpsam.predictor import LPSAMPredictor
from anaus_core.maskset import MaskSet

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.float32,
)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (recursively) in given folders, sorted per folder."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise UserInputError(f"{item}: no such image file or folder")
    if not files:
        raise UserInputError(f"{', '.join(map(str, inputs))}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return files


def overlay(image: np.ndarray, mask_set: MaskSet, *, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 overlay: each non-residual mask tinted and outlined in its own colour."""
    from skimage.segmentation import find_boundaries

    gray = image if image.ndim == 2 else image.mean(axis=2)
    canvas = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    for index, (mask, source) in enumerate(zip(mask_set.masks, mask_set.sources)):
        if source == "residual":
            continue
        colour = PALETTE[index % len(PALETTE)]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        canvas[find_boundaries(mask, mode="inner")] = colour
    return np.clip(canvas, 0, 255).astype(np.uint8)


def predict_files(predictor: LPSAMPredictor, files: Sequence[Path], out_dir: str | Path, *, png: bool = False, max_masks: int = 32, progress: bool = True) -> list[dict]:
    """Predict every file and write ``<name>.npz`` (masks bool (M, H, W), ids, scores, sources)
    and ``<name>.json`` (source path + mask records) per image, ``<name>_overlay.png`` with
    ``png``, and ``predictions.json`` listing them all. Returns the list."""
    from anaus_core.progress import make_progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, int] = {}
    summary: list[dict] = []
    skipped: list[dict] = []
    in_chans = predictor.model.in_chans
    with make_progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("lpsam predict", total=len(files))
        for start in range(0, len(files), predictor.batch_size):
            images, chunk_ok = [], []
            for path in files[start : start + predictor.batch_size]:
                # One corrupt or oversized image is skipped with a warning (as precompute-masks does),
                # not the whole batch; the skipped files are listed in skipped.json.
                try:
                    images.append(read_bounded_image(path, mode="L" if in_chans == 1 else "RGB"))
                    chunk_ok.append(path)
                except UserInputError as exc:
                    skipped.append({"image": str(path), "error": str(exc)})
                    print(f"warning: skipped {exc}", file=sys.stderr)
            for path, image, mask_set in zip(chunk_ok, images, predictor.predict(images, finalize=True, max_masks=max_masks) if images else []):
                name = path.stem
                names[name] = names.get(name, 0) + 1
                if names[name] > 1:
                    name = f"{name}_{names[name] - 1}"
                np.savez_compressed(out_dir / f"{name}.npz", masks=mask_set.masks, ids=mask_set.ids, scores=mask_set.scores, sources=np.asarray(mask_set.sources))
                record = {"image": str(path), "name": name, "size": list(mask_set.shape), "masks": mask_set.records()}
                (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
                if png:
                    Image.fromarray(overlay(image, mask_set)).save(out_dir / f"{name}_overlay.png")
                summary.append(record)
            bar.advance(task, len(files[start : start + predictor.batch_size]))
    if len(skipped) == len(files):
        raise UserInputError(f"{files[0]}: no readable image among the {len(files)} given (first: {skipped[0]['error']})")
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=1))
    if skipped:
        (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
    return summary
