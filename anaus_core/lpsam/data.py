"""Image-label datasets for LP-SAM adaptation.

A dataset is a folder with a description file ``dataset.yaml`` (or ``dataset.json``)::

    name: DDTI
    classes: {nodule: 1}            # class name -> label value in the label images
    # optional: images: img, labels: label   (sub-folder names, defaults shown)
    # optional, which images belong together (the validation split keeps a group on one side):
    # groups: groups.csv            # columns path,group; path = image file name (or path under the folder)
    # group_pattern: '^(patient[0-9]+)' # or: the first capture group of a regex on the image stem

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
    #: one group id per pair (patient, clip, ...); without a group source every image is its own
    groups: tuple[str, ...] = ()
    group_source: str = "image"


def _pair_groups(root: Path, name: str, data: dict, pairs: list[tuple[Path, Path]], description_file: Path | None) -> tuple[tuple[str, ...], str]:
    """Group id of every pair from the description's ``groups`` (CSV) or ``group_pattern``."""
    import re

    where = description_file or root
    if data.get("groups") and data.get("group_pattern"):
        raise UserInputError(f"{where}: give either 'groups' or 'group_pattern', not both")
    if data.get("groups"):
        table = _read_group_table(root / str(data["groups"]))
        groups = []
        for image_path, _ in pairs:
            candidates = (image_path.relative_to(root).as_posix(), image_path.name, image_path.stem)
            group = next((table[c] for c in candidates if c in table), None)
            if group is None:
                raise UserInputError(f"{root / str(data['groups'])}: no group for {image_path.relative_to(root).as_posix()}")
            groups.append(f"{name}/{group}")
        return tuple(groups), "groups"
    if data.get("group_pattern"):
        try:
            pattern = re.compile(str(data["group_pattern"]))
        except re.error as exc:
            raise UserInputError(f"{where}: group_pattern {data['group_pattern']!r} is not a regular expression ({exc})") from None
        groups = []
        for image_path, _ in pairs:
            match = pattern.search(image_path.stem)
            if match is None:
                raise UserInputError(f"{image_path}: its name does not match group_pattern {pattern.pattern!r} ({where})")
            groups.append(f"{name}/{match.group(1) if match.groups() else match.group(0)}")
        return tuple(groups), "group_pattern"
    return tuple(f"{name}/{image_path.stem}" for image_path, _ in pairs), "image"


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
    groups, group_source = _pair_groups(root, name, data, pairs, description_file)
    return DatasetDescription(root=root, name=name, classes=classes, pairs=tuple(pairs), groups=groups, group_source=group_source)


def _read_group_table(path: Path) -> dict[str, str]:
    """``path,group`` CSV (header required) -> {path: group}."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "group"} <= set(reader.fieldnames):
                raise UserInputError(f"{path}: needs a header with the columns 'path' and 'group'")
            table = {}
            for line, row in enumerate(reader, start=2):
                key, group = str(row.get("path") or "").strip(), str(row.get("group") or "").strip()
                if not key or not group:
                    raise UserInputError(f"{path}: line {line}: empty path or group")
                table[key] = group
            return table
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserInputError(f"{path}: cannot read the groups file ({exc})") from None


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


def split_indices(count: int, *, val_fraction: float, seed: int, groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split by group: every group lies wholly on one side
    (frames of one patient or clip never sit in both), about ``val_fraction`` of the groups go
    to validation (at least one, never all). ``groups``: one id per item (default: every
    item its own group).

    Validation never equals training: ``val_fraction <= 0`` is the explicit no-validation mode
    (empty validation list); fewer than two groups also gives no validation, with a warning.
    """
    import warnings

    from sklearn.model_selection import GroupShuffleSplit

    groups = [str(i) for i in range(count)] if groups is None else [str(g) for g in groups]
    if len(groups) != count:
        raise ValueError(f"{len(groups)} group ids for {count} items")
    if val_fraction >= 1:
        raise UserInputError(f"val_fraction {val_fraction}: must be below 1 (validation would take every group)")
    if count == 0 or val_fraction <= 0:
        return list(range(count)), []
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        warnings.warn(
            f"all {count} training pairs are one group ({distinct[0]!r}): there is nothing to validate on that is not "
            "trained on, so this run has no validation (best.pt = last epoch); give --val-data or a dataset with more groups",
            UserWarning, stacklevel=2,
        )
        return list(range(count)), []
    n_val = min(len(distinct) - 1, max(1, int(round(len(distinct) * val_fraction))))
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train, val = next(splitter.split(np.zeros(count), groups=groups))
    return sorted(int(i) for i in train), sorted(int(i) for i in val)
