"""The evaluation's ``FrameReader`` over the precompute job's decoders (``pipeline.ingest``), so
``anaus evaluate`` reads every format the precompute job ingests, through the same code.

``anaus_core`` may not import ``pipeline``; the CLI builds this adapter and injects it."""

from __future__ import annotations

from pathlib import Path

from anaus_core.errors import UserInputError
from anaus_core.evaluate.reader import Frame
from pipeline.ingest import MEDIA_EXTENSIONS, IngestError, SourceInfo, decode_frames_with_colour


def _dicom_spacing(path: Path) -> tuple[float, float] | None:
    """Pixel spacing in mm as (row, column) from the DICOM header, when present. (The ingest's
    ``SourceInfo`` carries the grouping tags but not the spacing, hence this header read.)"""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # the pixel decoder already accepted the file; missing tags are not errors
        return None
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None and len(value) == 2:
            spacing = (float(value[0]), float(value[1]))
            break
    if spacing is None and "SequenceOfUltrasoundRegions" in ds:
        # ultrasound regions state physical deltas in cm per pixel
        region = ds.SequenceOfUltrasoundRegions[0]
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if dx and dy and int(region.get("PhysicalUnitsXDirection", 0)) == 3:
            spacing = (abs(float(dy)) * 10.0, abs(float(dx)) * 10.0)
    return spacing


class IngestFrameReader:
    """``FrameReader``: ``read(path)`` -> every frame of the file as uint8 grayscale at the
    original size (the precompute job's normalisation), with DICOM PatientID and pixel spacing."""

    suffixes = frozenset(MEDIA_EXTENSIONS)

    def read(self, path: Path) -> list[Frame]:
        path = Path(path)
        info = SourceInfo()
        try:
            frames = [(frame, gray) for frame, gray, _ in decode_frames_with_colour(path, info=info)]
        except IngestError as exc:
            raise UserInputError(f"{path}: {exc.reason}") from None
        patient = info.dicom.get("PatientID") or None
        spacing = _dicom_spacing(path) if info.kind == "dicom" else None
        return [Frame(image=gray, frame=frame, patient_id=patient, spacing=spacing) for frame, gray in frames]
