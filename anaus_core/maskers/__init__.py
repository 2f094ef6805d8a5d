"""Mask sources: labels, k-means, Felzenszwalb, vanilla SAM, LP-SAM (see ``build_masker``).

``build_masker(name, **options)`` returns an object implementing ``Masker`` (see ``base.py``):
``masker(images, metas) -> list[MaskSet]`` of raw proposals and ``masker.fingerprint()``.
Model-free maskers import nothing heavy; ``sam`` and ``lpsam`` import torch lazily.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from anaus_core.errors import UserInputError
from anaus_core.maskers.base import ImageMeta, Masker, SampleError

MASKER_NAMES = ("labels", "kmeans", "felzenszwalb", "sam", "lpsam")

# Options every masker accepts so that a caller can pass its run-wide settings uniformly;
# CPU-only maskers ignore them (they change nothing in the output, so they are not part of the
# fingerprint).
_RUNTIME_OPTIONS = ("device", "batch_size")


def _masker_class(name: str):
    if name == "labels":
        from anaus_core.maskers.labels import LabelsMasker

        return LabelsMasker
    if name == "kmeans":
        from anaus_core.maskers.kmeans import KMeansMasker

        return KMeansMasker
    if name == "felzenszwalb":
        from anaus_core.maskers.felzenszwalb import FelzenszwalbMasker

        return FelzenszwalbMasker
    if name == "sam":
        from anaus_core.maskers.sam import SamMasker

        return SamMasker
    raise UserInputError(f"unknown masker {name!r} (choose one of: {', '.join(MASKER_NAMES)})")


def _build_lpsam(options: dict[str, Any]) -> Masker:
    checkpoint = options.get("checkpoint")
    hint = "--masker lpsam needs an LP-SAM checkpoint (--checkpoint PATH, written by `anaus lpsam train-prompter`)"
    if not checkpoint:
        raise UserInputError(f"{hint}; without one use --masker sam, kmeans or felzenszwalb")
    try:
        from anaus_core.maskers.lpsam import LPSAMMasker
    except ImportError as exc:
        raise UserInputError(f"{hint}; the LP-SAM predictor is not available in this install ({exc})") from None
    return _construct("lpsam", LPSAMMasker, options)


def _construct(name: str, cls, options: dict[str, Any]) -> Masker:
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in options if key not in parameters and not takes_any]
    if unknown:
        accepted = ", ".join(k for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY) or "none"
        raise UserInputError(f"--masker {name} does not take option(s) {', '.join(sorted(unknown))} (accepted: {accepted})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"--masker {name}: {exc}") from None


def build_masker(name: str, **options: Any) -> Masker:
    """Build the mask source ``name`` with its options.

    Names: ``labels`` (needs ``labels_dir``), ``kmeans``, ``felzenszwalb``, ``sam`` (needs
    ``checkpoint``: a vanilla SAM checkpoint), ``lpsam`` (needs ``checkpoint``: an LP-SAM
    checkpoint). Options whose value is None are treated as not given. ``device`` and
    ``batch_size`` are accepted by every masker (ignored by the CPU-only ones). Unknown names,
    unknown options and missing required ones raise ``UserInputError``.
    """
    name = str(name).strip().lower()
    options = {key: value for key, value in options.items() if value is not None}
    if name == "lpsam":
        return _build_lpsam(options)
    # Required options are checked before the class is imported (sam imports torch).
    if name == "labels" and "labels_dir" not in options:
        raise UserInputError("--masker labels needs the folder of label images (--labels DIR)")
    if name == "labels" and not Path(options["labels_dir"]).is_dir():
        raise UserInputError(f"{options['labels_dir']}: labels folder not found")
    if name == "sam" and "checkpoint" not in options:
        raise UserInputError("--masker sam needs a SAM checkpoint file (--checkpoint PATH, e.g. sam_vit_b_01ec64.pth)")
    cls = _masker_class(name)
    parameters = inspect.signature(cls).parameters
    for runtime in _RUNTIME_OPTIONS:
        if runtime in options and runtime not in parameters:
            options.pop(runtime)
    return _construct(name, cls, options)


__all__ = ["MASKER_NAMES", "ImageMeta", "Masker", "SampleError", "build_masker"]
