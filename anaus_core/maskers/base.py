"""The mask-source contract. Every ``--masker`` implements ``Masker``.

A masker turns a batch of stored-size 8-bit grayscale images into one ``MaskSet`` each. Model
based maskers run the whole batch on their device at once; the weight-free ones loop. The
pipeline applies ``MaskSet.finalize`` (min area, max masks, residual) afterwards, so maskers
return raw proposals with scores.

``fingerprint()`` returns everything that changes the output: the masker name, its options,
the sha256 of any checkpoint file and ``CODE_VERSION`` (bumped by hand when the algorithm
changes). The precompute job hashes it to decide what to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from anaus_core.maskset import MaskSet


class SampleError(Exception):
    """One sample cannot be processed (bad label file, size mismatch, ...). The pipeline records
    the message with the sample's path in ``errors.jsonl`` and goes on with the others."""


@dataclass(frozen=True)
class ImageMeta:
    """What a masker may need to know about an image besides its pixels."""

    key: str
    relpath: str  # path of the source file relative to the corpus root, '/'-separated
    frame: int | None = None  # frame number for DICOM/video sources
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Masker(Protocol):
    name: str

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the output."""

    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        """images: uint8 (H, W) each (sizes may differ); returns one MaskSet per image, same H, W.

        Raises SampleError only when a single-image batch fails; for larger batches the
        pipeline retries image by image to isolate the bad one.
        """
