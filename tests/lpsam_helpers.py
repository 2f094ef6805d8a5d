"""Small synthetic datasets for the LP-SAM tests (not a test module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def write_phantom_dataset(root: Path, *, count: int = 4, size: int = 64, seed: int = 0, multiclass: bool = False) -> Path:
    """Speckled images with a bright disc (label 1) and, when ``multiclass``, a dark ring around
    it (label 2): img/ + label/ + dataset.yaml, label values {0, 1(, 2)}."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        radius = rng.uniform(0.12, 0.22) * size
        distance = np.hypot(yy - cy, xx - cx)
        label = (distance < radius).astype(np.uint8)
        image = rng.gamma(2.0, 30.0, (size, size))
        image[label == 1] += 90
        if multiclass:
            ring = (distance >= radius) & (distance < radius * 1.5)
            label[ring] = 2
            image[ring] *= 0.3
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "img" / f"case{i:02d}.png")
        Image.fromarray(label).save(root / "label" / f"case{i:02d}.png")
    classes = {"disc": 1, "ring": 2} if multiclass else {"disc": 1}
    (root / "dataset.yaml").write_text(yaml.safe_dump({"name": root.name, "classes": classes}))
    return root


def write_ddti_dataset(ddti_dir: Path, root: Path) -> Path:
    """The DDTI fixture pair in the flat ``*_img.png`` / ``*_label.png`` layout with a dataset.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("20436_img.png", "20436_label.png"):
        shutil.copy(ddti_dir / name, root / name)
    (root / "dataset.yaml").write_text("name: DDTI\nclasses: {nodule: 1}\n")
    return root
