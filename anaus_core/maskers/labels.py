"""Ground-truth masks from label images (the ``labels`` mask source).

Label files live under a separate folder and mirror the corpus layout: the label of
``<corpus>/a/b/img.jpg`` is ``<labels_dir>/a/b/img.png`` (the same name first, then the same stem
with any lossless image extension: PNG, TIFF, BMP). For frame ``f`` of a multi-frame source the
label is ``<labels_dir>/a/b/cine_f00012.png`` (the stem plus ``_f`` and five digits). An optional
``replace=("_img", "_label")`` rewrites the stem first (DDTI-style names).

A label image is read as an integer map **without any scaling**: {0, 1} masks, {0, 255} masks
and multi-id maps (0 = background, every other value = one structure) all come through, one
mask per non-zero value. Palette PNGs give their indices (not the palette colours); RGB labels
whose channels differ give one id per distinct non-black colour. The label must have the
source image's original size (before the ingest resize); it is resized to the stored size
with nearest neighbour so ids never blend.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anaus_core.maskers.base import ImageMeta, SampleError
from anaus_core.maskset import MaskSet

CODE_VERSION = "labels-1"

LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
_LOSSY_EXTENSIONS = (".jpg", ".jpeg")


class LabelsMasker:
    """Masks from label images under ``labels_dir`` matched by relative path.

    Args:
        labels_dir: root folder of the label images (mirrors the corpus folder layout).
        replace: optional (old, new) substring replacement applied to the file stem, e.g.
            ``("_img", "_label")``.
    """

    name = "labels"

    def __init__(self, *, labels_dir: str | os.PathLike, replace: Sequence[str] | None = None) -> None:
        self.labels_dir = Path(labels_dir)
        if replace is not None and len(replace) != 2:
            raise ValueError("replace must be an (old, new) pair")
        self.replace = tuple(replace) if replace is not None else None

    def options(self) -> dict[str, Any]:
        return {"labels_dir": str(self.labels_dir.resolve()), "replace": list(self.replace) if self.replace else None}

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "code_version": CODE_VERSION, "options": self.options()}

    # -- finding and reading ----------------------------------------------------------------
    def label_path(self, meta: ImageMeta) -> Path:
        """The label file of a sample; raises SampleError when there is none."""
        rel = Path(meta.relpath.replace("\\", "/"))
        stem = rel.stem
        if self.replace is not None:
            stem = stem.replace(self.replace[0], self.replace[1])
        if meta.frame is not None:
            stem = f"{stem}_f{int(meta.frame):05d}"
        folder = self.labels_dir / rel.parent
        candidates: list[Path] = []
        if self.replace is None and meta.frame is None:
            candidates.append(folder / rel.name)
        candidates += [folder / f"{stem}{ext}" for ext in LABEL_EXTENSIONS]
        for candidate in candidates:
            if candidate.suffix.lower() not in _LOSSY_EXTENSIONS and candidate.is_file():
                return candidate
        # Same stem, any extension, any case (e.g. IMG.PNG); sorted for determinism.
        others = sorted(Path(p) for p in glob.glob(glob.escape(str(folder / stem)) + ".*"))
        for other in others:
            if other.suffix.lower() in LABEL_EXTENSIONS and other.is_file():
                return other
        for other in others:
            if other.suffix.lower() in _LOSSY_EXTENSIONS:
                raise SampleError(f"{other}: label is a JPEG; lossy compression changes label values, save labels as PNG")
        raise SampleError(f"no label file for {meta.relpath} (looked for {folder / stem}.png/.tif/.bmp)")

    def sample_fingerprint(self, meta: ImageMeta) -> dict[str, Any]:
        """Per-sample inputs besides the image: the label file's name and content hash, so an
        edited label re-runs the mask stage of that sample only."""
        path = self.label_path(meta)
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return {"label_file": path.relative_to(self.labels_dir).as_posix(), "label_sha256": digest}

    def read_label(self, path: Path) -> np.ndarray:
        """Integer (H, W) label map of a label file, values exactly as stored."""
        return read_label_map(path)

    # -- masker protocol -----------------------------------------------------------------------
    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        return [self._one(np.asarray(image), meta) for image, meta in zip(images, metas, strict=True)]

    def _one(self, image: np.ndarray, meta: ImageMeta) -> MaskSet:
        path = self.label_path(meta)
        label = self.read_label(path)
        height, width = image.shape
        label_h, label_w = label.shape
        original = meta.extra.get("original_size")
        if original is not None:
            orig_h, orig_w = int(original[0]), int(original[1])
            if (label_h, label_w) != (orig_h, orig_w):
                raise SampleError(f"{path}: label {label_w}x{label_h} does not match image {orig_w}x{orig_h} (width x height)")
        elif abs(label_h * width - label_w * height) > max(label_h, label_w):
            # Without the original size, at least the aspect ratio must agree.
            raise SampleError(f"{path}: label {label_w}x{label_h} does not match the aspect of image {width}x{height}")
        return MaskSet.from_label_map(resize_nearest(label, height, width), source=self.name, background=0)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as an integer map without scaling; raises SampleError on bad files."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise SampleError(f"{path}: label file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            array = _pil_label_array(img, path)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = _tifffile_label_array(path)
        else:
            raise SampleError(f"{path}: cannot read label image ({' '.join(str(exc).split())[:200]})") from None
    return array


def _pil_label_array(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img).astype(np.uint8)
    if mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.int64)  # P: palette indices are the ids
    if mode in ("LA", "PA", "La"):
        return np.asarray(img.getchannel(0)).astype(np.int64)
    if mode == "F":
        return _integral(np.asarray(img), path)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        return _colour_label(np.asarray(img.convert("RGB")))
    raise SampleError(f"{path}: unsupported label image mode {mode!r}")


def _tifffile_label_array(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as exc:
        raise SampleError(f"{path}: cannot read label image ({' '.join(str(exc).split())[:200]})") from None
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return _colour_label(array[..., :3])
    if array.ndim != 2:
        raise SampleError(f"{path}: label must be a single 2-D map, got shape {array.shape}")
    return _integral(array, path) if array.dtype.kind == "f" else array.astype(np.int64)


def _integral(array: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise SampleError(f"{path}: label image holds non-integer values (a label must be an id map)")
    return array.astype(np.int64)


def _colour_label(rgb: np.ndarray) -> np.ndarray:
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].astype(np.int64)  # gray stored as RGB: the value is the id
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    colours, inverse = np.unique(packed, return_inverse=True)
    # Black is background (0); every other colour gets 1..n in colour order.
    ids = np.arange(len(colours)) + (0 if colours[0] == 0 else 1)
    return ids[inverse].reshape(packed.shape)


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (pixel-centre sampling, as Pillow's NEAREST)."""
    label_h, label_w = label.shape
    if (label_h, label_w) == (height, width):
        return label
    rows = np.minimum(((np.arange(height) + 0.5) * (label_h / height)).astype(np.int64), label_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (label_w / width)).astype(np.int64), label_w - 1)
    return label[rows[:, None], cols[None, :]]
