"""Image-label datasets for LP-SAM adaptation.

A dataset is a folder with a description file ``dataset.yaml`` (or ``dataset.json``)::

    name: DDTI
    classes: {nodule: 1}            # class name -> label value in the label images
    # optional: images: img, labels: label   (sub-folder names, defaults shown)

and either ``img/`` + ``label/`` sub-folders with the same file stem (DDTI/TG3K-like; CAMUS-like
datasets put several classes in one label map, e.g. ``{lv_endo: 1, lv_myo: 2, la: 3}``), or
flat ``<stem>_img.png`` / ``<stem>_label.png`` pairs in the folder itself. Label values are
read as integers and compared with the class values: never divided by 255.

Several datasets train together; the model's classes are the union of their class names in
order of appearance, and each sample supervises only the classes its dataset declares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch.nn import functional as F

from anaus_core.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DESCRIPTION_FILES = ("dataset.yaml", "dataset.yml", "dataset.json")


@dataclass(frozen=True)
class DatasetDescription:
    root: Path
    name: str
    classes: dict[str, int]
    pairs: tuple[tuple[Path, Path], ...]


def read_description(root: str | Path, *, classes: dict[str, int] | None = None) -> DatasetDescription:
    """Read ``root/dataset.{yaml,json}`` (or use ``classes``) and list the image/label pairs."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"{root}: dataset folder not found")
    description_file = next((root / n for n in DESCRIPTION_FILES if (root / n).is_file()), None)
    data: dict = {}
    if description_file is not None:
        try:
            text = description_file.read_text()
            data = json.loads(text) if description_file.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise UserInputError(f"{description_file}: cannot be parsed ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserInputError(f"{description_file}: expected a mapping with 'name' and 'classes'")
    if classes is None:
        classes = data.get("classes")
        if description_file is None:
            raise UserInputError(f"{root}: no dataset.yaml/dataset.json naming the classes and their label values")
    if not isinstance(classes, dict) or not classes:
        raise UserInputError(f"{description_file or root}: 'classes' must map class names to label values, e.g. {{nodule: 1}}")
    try:
        classes = {str(k): int(v) for k, v in classes.items()}
    except (TypeError, ValueError):
        raise UserInputError(f"{description_file or root}: class label values must be integers, got {classes}") from None
    name = str(data.get("name", root.name))
    image_dir, label_dir = root / str(data.get("images", "img")), root / str(data.get("labels", "label"))
    pairs: list[tuple[Path, Path]] = []
    if image_dir.is_dir() and label_dir.is_dir():
        labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if image_path.stem not in labels:
                raise UserInputError(f"{image_path}: no label image with stem {image_path.stem!r} in {label_dir}")
            pairs.append((image_path, labels[image_path.stem]))
    else:
        for image_path in sorted(root.glob("*_img.*")):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            stem = image_path.name[: -len("_img" + image_path.suffix)]
            candidates = [root / f"{stem}_label{s}" for s in IMAGE_SUFFIXES]
            label_path = next((c for c in candidates if c.is_file()), None)
            if label_path is None:
                raise UserInputError(f"{image_path}: no {stem}_label.* beside it")
            pairs.append((image_path, label_path))
    if not pairs:
        raise UserInputError(f"{root}: no image/label pairs (expected img/ + label/ folders or *_img.png + *_label.png)")
    return DatasetDescription(root=root, name=name, classes=classes, pairs=tuple(pairs))


def union_class_names(descriptions: Sequence[DatasetDescription]) -> list[str]:
    names: list[str] = []
    for description in descriptions:
        names += [n for n in description.classes if n not in names]
    return names


def read_image(path: Path, *, in_chans: int) -> np.ndarray:
    """uint8 (C, H, W). Grayscale for C == 1, RGB for C == 3, all channels otherwise."""
    try:
        with Image.open(path) as image:
            if in_chans == 1:
                array = np.asarray(image.convert("L"))[None]
            elif in_chans == 3:
                array = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
            else:
                array = np.asarray(image)
                array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot be decoded as an image ({exc})") from None
    if array.shape[0] != in_chans:
        raise UserInputError(f"{path}: has {array.shape[0]} channels, the model takes {in_chans}")
    if array.dtype != np.uint8:
        raise UserInputError(f"{path}: expected 8-bit pixels, got {array.dtype}")
    return np.array(array)  # a writable copy (PIL arrays are read-only)


def read_label(path: Path) -> np.ndarray:
    """Integer label map (H, W) exactly as stored (palette indices for 'P' images)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot be decoded as a label image ({exc})") from None
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise UserInputError(f"{path}: label image has differing colour channels; store one integer per pixel")
        array = array[..., 0]
    return array.astype(np.int64)


class SegmentationPairs(torch.utils.data.Dataset):
    """Image-label pairs of one or more datasets, resized to the encoder input size.

    Item: ``pixels`` float32 (C, S, S) in 0..255 (bilinear), ``masks`` uint8 (K, S, S) one
    binary mask per model class (nearest), ``class_valid`` bool (K,) (class declared by the
    sample's dataset), ``index`` int. Picklable; works in DataLoader workers.
    """

    def __init__(self, descriptions: Sequence[DatasetDescription], *, class_names: Sequence[str], image_size: int, in_chans: int = 1, indices: Sequence[int] | None = None) -> None:
        self.class_names = list(class_names)
        self.image_size = image_size
        self.in_chans = in_chans
        self.items: list[tuple[Path, Path, dict[str, int]]] = [(i, l, d.classes) for d in descriptions for i, l in d.pairs]
        self.indices = list(range(len(self.items))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.indices[position]
        image_path, label_path, classes = self.items[index]
        image = read_image(image_path, in_chans=self.in_chans)
        label = read_label(label_path)
        if label.shape != image.shape[1:]:
            raise UserInputError(f"{label_path}: size {label.shape} differs from its image {image.shape[1:]}")
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(torch.from_numpy(image).float()[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        masks = np.zeros((len(self.class_names), *label.shape), np.uint8)
        valid = np.zeros(len(self.class_names), bool)
        for k, name in enumerate(self.class_names):
            if name in classes:
                masks[k] = label == classes[name]
                valid[k] = True
        masks_resized = F.interpolate(torch.from_numpy(masks)[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
        return {"pixels": pixels, "masks": masks_resized, "class_valid": torch.from_numpy(valid), "index": torch.tensor(index)}


def split_indices(count: int, *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split. With fewer than 2 items both are the whole set."""
    if count < 2 or val_fraction <= 0:
        return list(range(count)), list(range(count))
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = min(count - 1, max(1, int(round(count * val_fraction))))
    return sorted(order[n_val:]), sorted(order[:n_val])
