"""What the evaluation needs from an image reader, as a protocol: ``anaus_core`` never imports the
precompute job, so the CLI injects an adapter over ``pipeline.ingest`` (the same decoders the
precompute job uses: PNG/JPEG/TIFF 8/16-bit, DICOM single/multi-frame, video)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded image: ``image`` uint8 (H, W) at the original size; ``frame`` the frame number
    in a multi-frame source (None for single-frame files); ``patient_id`` (DICOM PatientID) and
    ``spacing`` ((row, column) in mm) when the file states them."""

    image: np.ndarray
    frame: int | None = None
    patient_id: str | None = None
    spacing: tuple[float, float] | None = None


class FrameReader(Protocol):
    """``suffixes``: lower-case file suffixes the reader decodes (``.png``, ``.dcm``, ``.mp4`` ...);
    ``read(path)``: every frame of the file; raises ``anaus_core.errors.UserInputError`` naming
    the file and the reason when it cannot be decoded."""

    suffixes: frozenset[str]

    def read(self, path: Path) -> list[Frame]: ...
