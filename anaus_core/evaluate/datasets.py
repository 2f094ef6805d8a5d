"""Labelled evaluation data, loaded once into memory.

Classification: ``ROOT/<class>/...`` (one folder per class, searched recursively; class names
are the folder names, sorted). Segmentation: the LP-SAM dataset layout, ``ROOT/dataset.yaml``
(``classes: {name: label value}``, optional ``images:``/``labels:`` folder names, default
``img``/``label``) with images and label images paired by file stem. Images go through the
injected ``FrameReader``; label images are read as integers, never rescaled.

Every item keeps its image resized to ``image_size`` x ``image_size`` (uint8) for the networks,
and, for segmentation, its label map at the original size (metrics are computed there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.evaluate.reader import FrameReader

DESCRIPTION_FILES = ("dataset.yaml", "dataset.yml")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


@dataclass
class EvalItem:
    """One evaluated image. ``id`` is unique (``file`` or ``file#frame``); ``file`` is the source
    path relative to the dataset root (the name groups and split files use); ``target`` is the
    class index (classification) or an int64 (H0, W0) map of class indices, 0 = background
    (segmentation)."""

    id: str
    file: str
    frame: int | None
    image: np.ndarray
    target: int | np.ndarray
    patient_id: str | None = None
    spacing: tuple[float, float] | None = None
    group: str = ""


@dataclass
class EvalDataset:
    task: str
    root: Path
    class_names: list[str]
    items: list[EvalItem]
    warnings: list[str] = field(default_factory=list)

    @property
    def strata(self) -> np.ndarray:
        """What folds are stratified on: the class (classification) or the set of classes present
        in the label map, as an integer code (segmentation)."""
        if self.task == "classification":
            return np.array([int(item.target) for item in self.items])
        codes = []
        for item in self.items:
            present = np.unique(item.target)
            codes.append(int(sum(1 << int(v) for v in present if v > 0)))
        return np.array(codes)

    @property
    def multi_frame_files(self) -> set[str]:
        return {item.file for item in self.items if item.frame is not None}


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (size, size), bilinear (the aspect ratio is not kept)."""
    if image.shape == (size, size):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image, "L").resize((size, size), Image.Resampling.BILINEAR))


def _media_files(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _decode(reader: FrameReader, path: Path, warnings: list[str]):
    try:
        return reader.read(path)
    except UserInputError as exc:
        warnings.append(f"{exc} (skipped)")
        return []


def load_classification(root: str | Path, *, reader: FrameReader, image_size: int, folds: int,
                        progress: Callable | None = None) -> EvalDataset:
    """Class-per-folder images. Raises ``UserInputError`` for a missing root, fewer than two
    classes, an empty class folder, or a class with fewer images than ``folds``; an unreadable
    file is skipped with a warning naming it."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"{root}: dataset folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UserInputError(f"{root}: expected one sub-folder per class (at least two), found {len(class_dirs)}")
    files = {d.name: _media_files(d, reader.suffixes) for d in class_dirs}
    for name, paths in files.items():
        if not paths:
            raise UserInputError(f"{root / name}: class folder has no images ({', '.join(sorted(reader.suffixes))})")
    warnings: list[str] = []
    items: list[EvalItem] = []
    all_paths = [(k, p) for k, d in enumerate(class_dirs) for p in files[d.name]]
    for class_index, path in (progress(all_paths) if progress else all_paths):
        rel = path.relative_to(root).as_posix()
        for frame in _decode(reader, path, warnings):
            item_id = rel if frame.frame is None else f"{rel}#{frame.frame}"
            items.append(EvalItem(id=item_id, file=rel, frame=frame.frame, image=resize_square(frame.image, image_size),
                                  target=class_index, patient_id=frame.patient_id, spacing=frame.spacing))
    counts = np.bincount([int(i.target) for i in items], minlength=len(class_dirs))
    for class_dir, count in zip(class_dirs, counts):
        if count < folds:
            raise UserInputError(f"{class_dir}: class has {count} readable image(s), fewer than the {folds} folds")
    return EvalDataset("classification", root, [d.name for d in class_dirs], items, warnings)


def read_segmentation_description(root: Path) -> tuple[dict[str, int], Path, Path, Path]:
    """``dataset.yaml`` -> (classes {name: value}, image folder, label folder, the yaml's path)."""
    description = next((root / n for n in DESCRIPTION_FILES if (root / n).is_file()), None)
    if description is None:
        raise UserInputError(f"{root}: no dataset.yaml naming the classes and their label values (classes: {{lesion: 1}})")
    try:
        data = yaml.safe_load(description.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"{description}: cannot be parsed ({str(exc).splitlines()[0]})") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise UserInputError(f"{description}: 'classes' must map class names to label values, e.g. {{lesion: 1}}")
    try:
        classes = {str(k): int(v) for k, v in classes.items()}
    except (TypeError, ValueError):
        raise UserInputError(f"{description}: class label values must be integers, got {classes}") from None
    if any(v <= 0 for v in classes.values()) or len(set(classes.values())) != len(classes):
        raise UserInputError(f"{description}: class label values must be distinct positive integers (0 is background), got {classes}")
    return classes, root / str(data.get("images", "img")), root / str(data.get("labels", "label")), description


def read_label_image(path: Path) -> np.ndarray:
    """Integer label map (H, W) exactly as stored."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot be decoded as a label image ({str(exc).splitlines()[0]})") from None
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise UserInputError(f"{path}: label image has differing colour channels; store one integer per pixel")
        array = array[..., 0]
    return array.astype(np.int64)


def load_segmentation(root: str | Path, *, reader: FrameReader, image_size: int,
                      progress: Callable | None = None) -> EvalDataset:
    """Image/label pairs. Raises ``UserInputError`` for a missing description, an image without a
    label, a label value not named in ``dataset.yaml``, an image/label size mismatch or a
    multi-frame image; an unreadable image is skipped with a warning naming it."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"{root}: dataset folder not found")
    classes, image_dir, label_dir, description = read_segmentation_description(root)
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise UserInputError(f"{root}: expected {image_dir.name}/ and {label_dir.name}/ folders beside {description.name}")
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() in LABEL_SUFFIXES}
    images = _media_files(image_dir, reader.suffixes)
    if not images:
        raise UserInputError(f"{image_dir}: no images")
    lookup = np.full(256 if not classes else max(256, max(classes.values()) + 1), -1, dtype=np.int64)
    lookup[0] = 0
    for index, value in enumerate(classes.values(), start=1):
        lookup[value] = index
    warnings: list[str] = []
    items: list[EvalItem] = []
    for path in (progress(images) if progress else images):
        if path.stem not in labels:
            raise UserInputError(f"{path}: no label image with stem {path.stem!r} in {label_dir}")
        frames = _decode(reader, path, warnings)
        if not frames:
            continue
        if len(frames) > 1 or frames[0].frame is not None:
            raise UserInputError(f"{path}: multi-frame image; segmentation pairs need one label per frame (export the frames)")
        label = read_label_image(labels[path.stem])
        frame = frames[0]
        if label.shape != frame.image.shape:
            raise UserInputError(f"{labels[path.stem]}: label is {label.shape[1]}x{label.shape[0]}, its image "
                                 f"{path.name} is {frame.image.shape[1]}x{frame.image.shape[0]}")
        if label.min() < 0 or label.max() >= lookup.size or (lookup[label] < 0).any():
            bad = sorted(set(np.unique(label).tolist()) - {0, *classes.values()})
            raise UserInputError(f"{labels[path.stem]}: label values {bad[:8]} are not in {description.name} "
                                 f"(classes {classes}, 0 = background)")
        rel = path.relative_to(root).as_posix()
        items.append(EvalItem(id=rel, file=rel, frame=None, image=resize_square(frame.image, image_size),
                              target=lookup[label], patient_id=frame.patient_id, spacing=frame.spacing))
    if not items:
        raise UserInputError(f"{image_dir}: no readable images")
    return EvalDataset("segmentation", root, list(classes), items, warnings)
